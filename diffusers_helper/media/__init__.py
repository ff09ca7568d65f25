"""Files and pixels: input images, resolution buckets, MP4 output, previews, job files and atomic writes."""
