import torch

from stkd.augment import nhwc_to_nchw, normalize, random_crop_flip


def test_crop_without_flip_is_a_shifted_window_of_the_padded_image():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, flip=False, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(16):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, images)  # 16 samples: some offset is not the centre


def test_flip_only_flips_about_half():
    images = torch.randint(0, 256, (200, 1, 4, 4), dtype=torch.uint8)
    out = random_crop_flip(images, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], images[i].flip(2)) and not torch.equal(out[i], images[i]) for i in range(200)]
    same = [torch.equal(out[i], images[i]) for i in range(200)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 70 < sum(flipped) < 130


def test_same_generator_same_output():
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(images, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_normalize_values_and_layout():
    images = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # 1x2x1x2
    out = normalize(images, mean=[0.5, 0.2], std=[0.5, 0.1])
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]])
    assert torch.allclose(out, expected, atol=1e-5)
    cl = normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0, 0, 0], [1, 1, 1], channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_nhwc_view():
    x = torch.arange(24, dtype=torch.uint8).view(1, 2, 4, 3)
    assert nhwc_to_nchw(x).shape == (1, 3, 2, 4)
    assert nhwc_to_nchw(x)[0, 2, 1, 3] == x[0, 1, 3, 2]
