"""What makes a video: the section engine (an event generator), section orders, sampling, conditioning."""
