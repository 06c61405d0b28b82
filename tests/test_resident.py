"""Data held on the device: the batched crop/flip, sharding, JPEG decoding, and equal training either way."""
import io

import numpy as np
import torch
import torch.nn.functional as F

from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.data import JpegNpz, _transforms
from ptgraph.trainers.loop import train
from ptgraph.trainers.resident import DeviceBatches, ImageTensors, _crop_flip, image_tensors


def test_crop_flip_matches_per_sample_slicing():
    x = torch.randint(0, 256, (6, 3, 8, 10), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4], [0, 8], [7, 1]])
    flips = torch.tensor([False, True, False, True, True, False])
    got = _crop_flip(x, offsets, flips)
    padded = F.pad(x, (4, 4, 4, 4))
    for i, ((dy, dx), flip) in enumerate(zip(offsets.tolist(), flips.tolist())):
        want = padded[i, :, dy:dy + 8, dx:dx + 10]
        assert torch.equal(got[i], want.flip(-1) if flip else want)


def test_batches_shard_normalise_and_repeat():
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    split = ImageTensors(images, torch.arange(50), augment=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    order = torch.randperm(50).tolist()
    rank0, rank1 = (DeviceBatches(split, order[r::2], 8, drop_last=True, seed=1) for r in range(2))
    assert len(rank0) == 3 and len(DeviceBatches(split, order[0::2], 8, drop_last=False, seed=1)) == 4
    seen = [int(i) for b in (rank0, rank1) for _, y in b for i in y]
    assert len(seen) == len(set(seen)) == 48
    x, y = next(iter(rank0))
    torch.testing.assert_close(x, (images[y].float() / 255 - 0.5) / 0.25)
    aug = ImageTensors(images, torch.arange(50), augment=True)
    first = [x for x, _ in DeviceBatches(aug, order, 10, drop_last=True, seed=3)]
    again = [x for x, _ in DeviceBatches(aug, order, 10, drop_last=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def _npz(path, n=12):
    from PIL import Image

    gen = np.random.default_rng(0)
    blobs, offsets = [], [0]
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(gen.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(blobs[-1]))
    jpeg, offsets, labels = np.concatenate(blobs), np.array(offsets), gen.integers(0, 10, n).astype(np.uint8)
    np.savez(path, classes=np.array([str(i) for i in range(10)]), train_jpeg=jpeg, train_offsets=offsets,
             train_labels=labels, test_jpeg=jpeg, test_offsets=offsets, test_labels=labels)


def test_jpeg_npz_decodes_to_what_the_loader_gives(tmp_path):
    _npz(tmp_path / "c.npz")
    dataset = JpegNpz(str(tmp_path / "c.npz"), "test", _transforms("cifar", 32, False))
    split = image_tensors(dataset, train=False)
    assert split.images.dtype == torch.uint8 and split.images.shape == (12, 3, 32, 32)
    x, y = next(iter(DeviceBatches(split, range(12), 12, drop_last=False, seed=0)))
    for i in range(12):
        want, label = dataset[i]
        torch.testing.assert_close(x[i], want, atol=1e-5, rtol=1e-5)
        assert int(y[i]) == label


def test_training_from_resident_data_equals_the_loader_path(tmp_path):
    def weights(mode):
        cfg = TrainConfig(model="toy_models:small_resnet", data="synthetic:easy", epochs=2, batch_size=32,
                          steps_per_epoch=4, reconfig_steps=4, penalty_ratio=0.5, threshold=2.1, lr=0.1,
                          run_dir=str(tmp_path / mode), tensorboard=False, data_on_device=mode)
        train(cfg)
        return torch.load(tmp_path / mode / "checkpoint.pt", weights_only=False)["model"]

    loaded, resident = weights("off"), weights("on")
    assert loaded.keys() == resident.keys()
    assert all(torch.equal(loaded[k], resident[k]) for k in loaded)
