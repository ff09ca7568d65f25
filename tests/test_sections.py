"""Section planning and the history layout of both orders, without models."""

import pytest
import torch

from diffusers_helper.pipeline.sections import HISTORY_SIZES, InvertedAntiDrifting, Vanilla, crossfade

EXPECTED_PADDINGS = {
    1: [0], 2: [1, 0], 3: [2, 1, 0], 4: [3, 2, 1, 0], 5: [3, 2, 2, 1, 0],
    6: [3, 2, 2, 2, 1, 0], 7: [3, 2, 2, 2, 2, 1, 0], 8: [3, 2, 2, 2, 2, 2, 1, 0],
}  # fmt: skip


@pytest.mark.parametrize("count", range(1, 9))
def test_padding_schedule(count):
    assert [s.padding for s in InvertedAntiDrifting().plan(count)] == EXPECTED_PADDINGS[count]
    assert [s.padding for s in Vanilla().plan(count)] == [0] * count
    sections = InvertedAntiDrifting().plan(count)
    assert sections[-1].is_last and sections[0].is_first and [s.index for s in sections] == list(range(count))


def _pixels_of(latents: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: (T - 1) * 4 + 1 frames of pixels, as the real VAE makes."""
    count = (latents.shape[2] - 1) * 4 + 1
    return torch.zeros(1, 3, count, 8, 8)


def _run_sections(order, count: int, window: int) -> list[int]:
    start = torch.zeros(1, 16, 1, 4, 4)
    history = order.initial_history(start)
    video, counts = None, []
    for section in order.plan(count):
        generated = torch.ones(1, 16, window, 4, 4)
        history = order.append(history, generated, start, section)
        latents = order.video_latents(history)
        if video is not None:
            latents = order.latents_to_decode(latents, section, window)
        video = order.join(video, _pixels_of(latents), window * 4 - 3)
        counts.append(len(video.frames))
    return counts


@pytest.mark.parametrize("count", range(1, 9))
@pytest.mark.parametrize("order", [InvertedAntiDrifting(), Vanilla()], ids=["framepack", "f1"])
def test_frame_count_after_each_section(order, count):
    counts = _run_sections(order, count, window=9)
    if isinstance(order, Vanilla):  # the start frame, then 36 frames a section
        assert counts == [36 * i + 1 for i in range(1, count + 1)]
    else:  # 33 frames, 36 more a section, and the start frame with the last section
        assert counts == [36 * i - 3 for i in range(1, count)] + [36 * count + 1]


def test_inverted_layout_puts_the_window_after_padding_and_reads_the_history_front():
    order = InvertedAntiDrifting()
    start = torch.full((1, 16, 1, 4, 4), -1.0)
    history = torch.arange(30, dtype=torch.float32).view(1, 1, 30, 1, 1).expand(1, 16, 30, 4, 4).contiguous()
    section = order.plan(3)[0]  # padding 2
    layout = order.layout(history, start, section, window=9)
    assert layout.latent_indices.tolist() == list(range(1 + 18, 1 + 18 + 9))
    assert layout.clean_indices.tolist() == [0, 28]
    assert layout.clean_indices_2x.tolist() == [29, 30]
    assert layout.clean_indices_4x.tolist() == list(range(31, 47))
    assert layout.clean_latents[0, 0, :, 0, 0].tolist() == [-1.0, 0.0]  # start frame + newest history frame
    assert layout.clean_latents_2x[0, 0, :, 0, 0].tolist() == [1.0, 2.0]
    assert layout.clean_latents_4x[0, 0, :, 0, 0].tolist() == list(map(float, range(3, 19)))


def test_vanilla_layout_reads_the_history_tail_before_the_window():
    order = Vanilla()
    start = torch.full((1, 16, 1, 4, 4), -1.0)
    history = torch.arange(30, dtype=torch.float32).view(1, 1, 30, 1, 1).expand(1, 16, 30, 4, 4).contiguous()
    layout = order.layout(history, start, order.plan(2)[1], window=9)
    assert layout.clean_indices_4x.tolist() == list(range(1, 17))
    assert layout.clean_indices_2x.tolist() == [17, 18]
    assert layout.clean_indices.tolist() == [0, 19]
    assert layout.latent_indices.tolist() == list(range(20, 29))
    assert layout.clean_latents[0, 0, :, 0, 0].tolist() == [-1.0, 29.0]
    assert layout.clean_latents_2x[0, 0, :, 0, 0].tolist() == [27.0, 28.0]
    assert layout.clean_latents_4x[0, 0, :, 0, 0].tolist() == list(map(float, range(11, 27)))


def test_histories_start_with_zeros_and_the_orders_place_new_latents_on_opposite_ends():
    start = torch.full((1, 16, 1, 4, 4), 7.0)
    inverted, vanilla = InvertedAntiDrifting(), Vanilla()
    assert inverted.initial_history(start).shape[2] == sum(HISTORY_SIZES)
    assert vanilla.initial_history(start)[0, 0, -1, 0, 0] == 7.0
    new = torch.full((1, 16, 9, 4, 4), 3.0)
    last = inverted.plan(1)[0]
    appended = inverted.append(inverted.initial_history(start), new, start, last)
    assert appended[0, 0, :11, 0, 0].tolist() == [7.0] + [3.0] * 9 + [0.0]
    appended = vanilla.append(vanilla.initial_history(start), new, start, vanilla.plan(1)[0])
    assert appended[0, 0, -10:, 0, 0].tolist() == [7.0] + [3.0] * 9


def test_crossfade_goes_linearly_from_the_outgoing_to_the_incoming_clip():
    outgoing = torch.full((1, 3, 3, 2, 2), 0.8)
    incoming = torch.full((1, 3, 3, 2, 2), -0.8)
    assert crossfade(outgoing, incoming)[0, 0, :, 0, 0].tolist() == pytest.approx([0.8, 0.0, -0.8])


def _framepack_video(order, decodes: list[torch.Tensor], overlap: int) -> torch.Tensor:
    """The reference: FramePack keeps every decoded pixel in the VAE's dtype, blends in that dtype (the weights in
    the first clip's dtype), and converts the whole video to uint8 (clamp, scale, truncate) when it writes it."""
    history = None
    for decoded in decodes:
        if history is None:
            history = decoded
            continue
        first, second = (decoded, history) if isinstance(order, InvertedAntiDrifting) else (history, decoded)
        weights = torch.linspace(1, 0, overlap, dtype=first.dtype).view(1, 1, -1, 1, 1)
        blended = weights * first[:, :, -overlap:] + (1 - weights) * second[:, :, :overlap]
        history = torch.cat([first[:, :, :-overlap], blended, second[:, :, overlap:]], dim=2).to(first)
    frames = (torch.clamp(history.float(), -1.0, 1.0) * 127.5 + 127.5).to(torch.uint8)
    return frames[0].permute(1, 2, 3, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("order", [InvertedAntiDrifting(), Vanilla()], ids=["framepack", "f1"])
def test_joined_frames_equal_framepacks_float_history_exactly(order, dtype):
    """Keeping uint8 frames plus the unblended pixels of the next overlap gives FramePack's frames bit for bit."""
    window, overlap = 9, 9 * 4 - 3
    generator = torch.Generator().manual_seed(0)
    first_length = {"InvertedAntiDrifting": (window - 1) * 4 + 1, "Vanilla": window * 4 + 1}[type(order).__name__]
    lengths = [first_length] + [(2 * window - 1) * 4 + 1] * 3
    decodes = [(torch.randn(1, 3, n, 4, 6, generator=generator) * 0.7).to(dtype) for n in lengths]
    video = None
    for decoded in decodes:
        video = order.join(video, decoded, overlap)
    expected = _framepack_video(order, decodes, overlap)
    assert video.frames.shape == expected.shape
    assert torch.equal(video.frames, expected)


def test_an_end_latent_is_the_first_sections_post_frame_only():
    order = InvertedAntiDrifting()
    start, end = torch.full((1, 16, 1, 4, 4), -1.0), torch.full((1, 16, 1, 4, 4), 7.0)
    history = torch.arange(30, dtype=torch.float32).view(1, 1, 30, 1, 1).expand(1, 16, 30, 4, 4).contiguous()
    first, second = order.plan(2)
    assert order.layout(history, start, first, 9, end).clean_latents[0, 0, :, 0, 0].tolist() == [-1.0, 7.0]
    assert order.layout(history, start, second, 9, end).clean_latents[0, 0, :, 0, 0].tolist() == [-1.0, 0.0]
    assert order.layout(history, start, first, 9).clean_latents[0, 0, :, 0, 0].tolist() == [-1.0, 0.0]
