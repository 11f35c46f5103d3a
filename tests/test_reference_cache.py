"""The reference-embedding cache (bundle/reference_cache.py, issue 12 item 5): pi_ref's image embeddings computed
once per image, float16, reused in later epochs; training with it equals training without it up to that rounding."""

import logging

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import REPO

EPOCHS = 3


def _batches() -> list[dict]:
    """Two fixed batches of 2 images (64 px), targets, 4 prompt sets of 6 clicks."""
    out = []
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        target = torch.zeros(2, 1, 64, 64)
        for i in range(2):
            target[i, :, 8 + 4 * i:36 + 2 * i, 10:44 - 3 * i] = 1
        labels = torch.randint(0, 2, (2, 4, 6), generator=g)
        labels[..., 0] = 1
        out.append({"image": torch.rand(2, 3, 64, 64, generator=g), "label": target,
                    "points": torch.randint(0, 64, (2, 4, 6, 2), generator=g).float(), "point_labels": labels})
    return out


def _net():
    from bundle.networks import PromptableSAM

    net = PromptableSAM("tiny", 64, lora_rank=4, seed=0)
    with torch.no_grad():  # LoRA B starts at zero; move it so that the actor differs from the reference at once
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return net


def _train(cache) -> tuple[list[dict], dict, object]:
    """EPOCHS epochs of the full SAMPO loss over the fixed batches (SGD, seeded): per-iteration loss terms,
    trained parameters, and the network."""
    from ignite.engine import Events

    from bundle.engines import SAMPOTrainer
    from bundle.preference import SAMPOLoss

    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    trainer = SAMPOTrainer("cpu", EPOCHS, _batches(), net, opt, SAMPOLoss(), decollate=False, reference_cache=cache)
    terms = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: terms.append(
        {k: float(e.state.output[k]) for k in ("loss", "po1", "po2", "sup", "iou_head", "margins")}))
    trainer.run()
    return terms, {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}, net


def test_training_with_the_cache_equals_training_without_it_within_float16_rounding():
    from bundle.reference_cache import ReferenceEmbeddingCache

    plain_terms, plain, _ = _train(None)
    cache = ReferenceEmbeddingCache()
    cached_terms, cached, _ = _train(cache)
    assert (cache.misses, cache.hits) == (4, 4 * (EPOCHS - 1))  # 4 images encoded once, then served
    start = {n: p.detach() for n, p in _net().named_parameters() if p.requires_grad}
    assert any(not torch.allclose(plain[n], start[n]) for n in plain), "training did not move the weights"
    # The only difference is the float16 copy of the reference embedding (relative error <= 2^-11 ~ 5e-4 per
    # value). It moves only the reference logits, which enter PO1 / PO2 / the reward margin through beta (0.1) times
    # a log-likelihood ratio; SUP and the IoU head do not see the reference at all. So the terms move by at most
    # ~beta * 5e-4 = 5e-5 of their size, and the 6 SGD steps' updates by as much (measured: <= 3e-7 on the terms,
    # 2e-8 on the parameters). rel 1e-4 bounds that with a margin of 100 over the measurement, and fails on a wrong
    # embedding: serving each image its neighbour's moves PO1 by 1.4e-3 (20 x the bound) in the first step.
    assert len(cached_terms) == len(plain_terms) == 2 * EPOCHS
    for got, want in zip(cached_terms, plain_terms):
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (k, got, want)
    for n in plain:
        torch.testing.assert_close(cached[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_later_epochs_never_call_the_reference_encoder_and_the_cached_embedding_is_a_fresh_encode():
    from bundle.engines import SAMPOTrainer
    from bundle.preference import SAMPOLoss
    from bundle.reference_cache import ReferenceEmbeddingCache

    torch.manual_seed(0)
    net = _net()
    calls = []  # (epoch, reference?) per image-encoder forward: the reference runs without gradients
    trainer_box = {}
    net._sam.image_encoder.register_forward_hook(
        lambda m, i, o: calls.append((trainer_box["t"].state.epoch, not torch.is_grad_enabled())))
    cache = ReferenceEmbeddingCache()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    trainer = SAMPOTrainer("cpu", 2, _batches(), net, opt, SAMPOLoss(), decollate=False, reference_cache=cache)
    trainer_box["t"] = trainer
    trainer.run()
    assert [c for c in calls if c[0] == 1] == [(1, False), (1, True)] * 2  # epoch 1: actor and reference per batch
    assert [c for c in calls if c[0] == 2] == [(2, False)] * 2  # epoch 2: the actor only
    assert cache.encoded_batches == 2 and len(cache) == 4
    # what the cache serves after training (adapters trained: the base unchanged) is pi_ref's encode now
    images = torch.cat([b["image"] for b in _batches()])
    with net.reference():
        fresh = net.encode(images)
        served = cache.encode(net, images)
    assert cache.encoded_batches == 2 and served.dtype == torch.float32
    torch.testing.assert_close(served, fresh, rtol=2**-10, atol=1e-6)  # float16: relative error <= 2^-11
    assert not torch.equal(served, fresh)  # it is the float16 copy


def test_a_change_of_the_base_weights_drops_the_entries(caplog):
    from bundle.networks.lora import fold_adapters
    from bundle.reference_cache import ReferenceEmbeddingCache

    net, cache, images = _net(), ReferenceEmbeddingCache(), _batches()[0]["image"]
    with net.reference():
        before = cache.encode(net, images)
    fold_adapters(net.sam, 0)  # paper 003's stage boundary: the reference becomes the model trained so far
    with caplog.at_level(logging.INFO, logger="bundle.reference_cache"), net.reference():
        after = cache.encode(net, images)
        fresh = net.encode(images)
    assert "reference encoder weights changed: 2 cached reference embeddings dropped" in caplog.text
    assert cache.encoded_batches == 2 and not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, fresh, rtol=2**-10, atol=1e-6)


def test_another_crop_of_an_image_is_another_entry_and_a_partly_cached_batch_encodes_only_the_new_images():
    from bundle.reference_cache import ReferenceEmbeddingCache

    net, cache = _net(), ReferenceEmbeddingCache()
    images = _batches()[0]["image"]
    with net.reference():
        cache.encode(net, images[:1])
        shifted = torch.roll(images, 1, dims=-1)  # same item, other preprocessing: other pixels
        out = cache.encode(net, torch.cat([images[:1], shifted[:1]]))
        fresh = net.encode(torch.cat([images[:1], shifted[:1]]))
    assert (cache.hits, cache.misses, cache.encoded_batches) == (1, 2, 2)
    torch.testing.assert_close(out, fresh, rtol=2**-10, atol=1e-6)


def test_the_disk_folder_serves_another_process_and_memory_stays_within_max_mib(tmp_path):
    from bundle.reference_cache import ReferenceEmbeddingCache

    net, images = _net(), _batches()[0]["image"]
    with net.reference():
        first = ReferenceEmbeddingCache(cache_dir=str(tmp_path)).encode(net, images)
        other = ReferenceEmbeddingCache(cache_dir=str(tmp_path))  # a new run: empty memory, the same folder
        again = other.encode(net, images)
    assert other.encoded_batches == 0 and other.hits == 2
    assert torch.equal(first, again)
    assert len(list(tmp_path.glob("*/*.npy"))) == 2
    entry = first[0].numel() * 2  # float16 bytes of one embedding
    small = ReferenceEmbeddingCache(max_mib=1.5 * entry / 2**20)
    with net.reference():
        small.encode(net, images)
    assert len(small) == 1 and small.nbytes == entry  # the least recently used went out


def test_autocast_embeddings_are_entries_of_their_own_and_come_back_in_the_autocast_dtype(caplog):
    from bundle.reference_cache import ReferenceEmbeddingCache

    net, cache, images = _net(), ReferenceEmbeddingCache(), _batches()[0]["image"]
    with caplog.at_level(logging.INFO, logger="bundle.reference_cache"), net.reference():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = cache.encode(net, images)
        full = cache.encode(net, images)
    assert mixed.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert (cache.misses, cache.encoded_batches, len(cache)) == (4, 2, 4)  # no float32 step gets a bf16 embedding
    assert "reference embedding cache: 1 KiB per image (32 x 4 x 4 float16)" in caplog.text
    # and through the trainer's mixed precision (network_pass under autocast): epoch 2 served from the cache
    from bundle.engines import SAMPOTrainer
    from bundle.preference import SAMPOLoss

    cache = ReferenceEmbeddingCache()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    SAMPOTrainer("cpu", 2, _batches()[:1], net, opt, SAMPOLoss(), decollate=False, amp=True, amp_dtype="bfloat16",
                 reference_cache=cache).run()
    assert (cache.misses, cache.hits) == (2, 2)


def test_random_augmentation_bypasses_the_cache_with_one_log_line(caplog, monkeypatch):
    import bundle.reference_cache as rc

    monkeypatch.setattr(rc, "image_digests", lambda images: pytest.fail("a bypassed cache hashed an image"))
    net, images = _net(), _batches()[0]["image"]
    cache = rc.ReferenceEmbeddingCache(augment=[object()])
    with caplog.at_level(logging.INFO, logger="bundle.reference_cache"), net.reference():
        out = [cache.encode(net, images) for _ in range(2)]
        fresh = net.encode(images)
    assert caplog.text.count("reference_cache bypassed: train#augment holds random augmentation") == 1
    assert torch.equal(out[0], fresh) and torch.equal(out[1], fresh) and len(cache) == 0


def test_bad_settings_name_the_key():
    from bundle.reference_cache import ReferenceEmbeddingCache

    with pytest.raises(ValueError, match="max_mib must be a number > 0"):
        ReferenceEmbeddingCache(max_mib=0)
    with pytest.raises(ValueError, match="reference_cache_dir must be a folder path or null"):
        ReferenceEmbeddingCache(cache_dir=3)


@pytest.mark.parametrize("overlay", [[], ["tasks/consep_t1.yaml"], ["semi_supervised.yaml"]])
def test_configs_give_the_trainer_the_cache_by_default_and_none_when_off(tmp_path, overlay):
    from bundle.reference_cache import ReferenceEmbeddingCache

    def parsed(**overrides):
        parser = ConfigParser()
        parser.read_config([str(REPO / "configs" / f) for f in ["train.yaml", *overlay]])
        parser.update({"bundle_root": str(tmp_path), **overrides})
        return parser

    trainer = "semi#trainer" if overlay == ["semi_supervised.yaml"] else "train#trainer"
    parser = parsed()
    assert parser[trainer]["reference_cache"] == "@reference_embedding_cache"
    cache = parser.get_parsed_content("reference_embedding_cache")
    assert isinstance(cache, ReferenceEmbeddingCache) and cache.cache_dir is None
    assert cache.bypassed == (overlay == ["tasks/consep_t1.yaml"])  # the task's stain augmentation
    assert parsed(reference_cache_dir=str(tmp_path / "c")).get_parsed_content(
        "reference_embedding_cache").cache_dir == str(tmp_path / "c")
    assert parsed(reference_cache=False).get_parsed_content("reference_embedding_cache") is None
