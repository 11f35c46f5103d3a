"""bundle/predictor.py: the embedding cache answers later clicks without the encoder, and changes nothing else.

Encoder calls are counted by wrapping the real ``encode`` (the encoder still runs); the masks are compared with
``net(x)`` (the uncached path) and with ``segment_anything.SamPredictor`` (METHOD.md "Tokens").
"""

import threading

import numpy as np
import pytest
import torch

from bundle.guidance import points_to_guidance
from bundle.networks import PromptableSAM
from bundle.predictor import CachedPromptInferer, SAMPOPredictor
from test_conformance import perturbed, reference_logits

S = 64


@pytest.fixture
def net():
    return perturbed("tiny", S)


def count_encodes(net) -> list:
    calls, encode = [], net.encode

    def counted(images):
        calls.append(images.shape[0])
        return encode(images)

    net.encode = counted
    return calls


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, S, S), dtype=np.float32))


def net_x(net, image, points, labels) -> torch.Tensor:
    guidance = points_to_guidance(torch.tensor([points], dtype=torch.float32), torch.tensor([labels]), (S, S))
    with torch.no_grad():
        return net(torch.cat([image[None], guidance], 1))[0]


CLICKS = [([[10, 20]], [1]), ([[10, 20], [40, 12]], [1, 0]), ([[10, 20], [40, 12], [30, 50]], [1, 0, 1])]


def test_later_clicks_only_decode_and_equal_net_x_and_sam_predictor(net):
    image = images(1)[0]
    predictor = SAMPOPredictor(net, cache_size=2)
    calls = count_encodes(net)
    for points, labels in CLICKS:
        predictor.set_image(image, "img0")
        out = predictor.predict(points, labels)
        torch.testing.assert_close(out, net_x(net, image, points, labels), atol=1e-5, rtol=0)
        best, _ = reference_logits(net._sam, image, np.array(points, np.float32), np.array(labels))
        torch.testing.assert_close(out[0], best, atol=2e-4, rtol=0)
    assert calls == [1] + [1] * len(CLICKS)  # the three net_x calls; the predictor encoded once
    assert (predictor.misses, predictor.hits) == (1, 2)


def test_uint8_image_like_sam_predictor(net):
    array = (np.random.default_rng(3).random((S, S, 3)) * 255).astype(np.uint8)
    predictor = SAMPOPredictor(net)
    predictor.set_image(array)
    best, _ = reference_logits(net._sam, array, np.array([[5, 6], [30, 30]], np.float32), np.array([1, 0]))
    torch.testing.assert_close(predictor.predict([[5, 6], [30, 30]], [1, 0])[0], best, atol=2e-4, rtol=0)


def test_lru_bound_and_content_change_under_the_same_id(net):
    imgs = images(3)
    predictor = SAMPOPredictor(net, cache_size=2)
    calls = count_encodes(net)
    for i in (0, 1, 0, 2):  # 0 is used again before 2 arrives, so 1 is the least recently used
        predictor.set_image(imgs[i], f"img{i}")
    assert len(predictor.cache) == 2 and len(calls) == 3
    predictor.set_image(imgs[0], "img0")  # still cached
    assert len(calls) == 3
    predictor.set_image(imgs[1], "img1")  # evicted: encoded again
    assert len(calls) == 4
    changed = imgs[1].clone()
    changed[0, 0, 0] += 0.5
    predictor.set_image(changed, "img1")  # same id, other pixels
    assert len(calls) == 5 and len(predictor.cache) == 2
    out = predictor.predict([[10, 20]], [1])
    torch.testing.assert_close(out, net_x(net, changed, [[10, 20]], [1]), atol=1e-5, rtol=0)


def test_zero_cache_encodes_every_time_and_bad_size_is_an_error(net):
    predictor = SAMPOPredictor(net, cache_size=0)
    calls = count_encodes(net)
    predictor.set_image(images(1)[0], "a")
    predictor.set_image(images(1)[0], "a")
    assert len(calls) == 2
    with pytest.raises(ValueError, match="cache_size must be an integer >= 0, got -1"):
        SAMPOPredictor(net, cache_size=-1)
    with pytest.raises(RuntimeError, match="call set_image"):
        SAMPOPredictor(net).predict([[1, 1]], [1])


def test_weight_change_invalidates(net):
    image = images(1)[0]
    predictor = SAMPOPredictor(net)
    predictor.set_image(image, "img0")
    calls = count_encodes(net)
    other = perturbed("tiny", S)  # other LoRA weights
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    net.load_state_dict(other.state_dict())  # what reloading a served model does in place
    predictor.set_image(image, "img0")
    assert len(calls) == 1
    out = predictor.predict([[10, 20]], [1])
    predictor.invalidate()
    predictor.set_image(image, "img0")
    assert len(calls) == 2
    torch.testing.assert_close(out, net_x(net, image, [[10, 20]], [1]), atol=1e-5, rtol=0)  # the new weights' mask


def test_inferer_equals_net_x_and_a_new_network_starts_a_new_cache(net):
    from monai.data import MetaTensor

    inferer = CachedPromptInferer(cache_size=4)
    image = images(1)[0]
    x = MetaTensor(torch.cat([image[None], points_to_guidance(torch.tensor([[[10.0, 20.0]]]), torch.tensor([[1]]),
                                                              (S, S))], 1), meta={"filename_or_obj": "img0.png"})
    with torch.no_grad():
        expected = net(x.as_tensor())
    calls = count_encodes(net)
    first = inferer(x, net)
    second = inferer(x, net)
    assert len(calls) == 1 and torch.equal(first, second)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    assert inferer.predictor(net).cache.keys()[0][0] == "img0.png"
    assert torch.equal(CachedPromptInferer(cache_size=4)(x, net), first) and len(calls) == 1  # a re-parsed config
    reloaded = perturbed("tiny", S)  # MONAI Label reloads a changed model.pt as a new network object
    assert inferer.predictor(reloaded) is not inferer.predictor(net)
    with torch.no_grad():
        torch.testing.assert_close(inferer(x, reloaded), reloaded(x.as_tensor()), atol=1e-5, rtol=0)


def test_inferer_runs_torchscript_as_it_is(tmp_path):
    from bundle.export import export_torchscript, merge_lora

    merged = merge_lora(perturbed("tiny", S))
    ts = torch.jit.load(export_torchscript(merged, tmp_path / "model.ts", verify=False))
    x = torch.cat([images(1), points_to_guidance(torch.tensor([[[3.0, 4.0]]]), torch.tensor([[1]]), (S, S))], 1)
    with torch.no_grad():
        torch.testing.assert_close(CachedPromptInferer()(x, ts), merged(x), atol=2e-4, rtol=0)


def test_concurrent_clicks_on_two_images_each_get_their_own_mask(net):
    imgs = images(2, seed=7)
    clicks = [([[10, 20], [40, 12]], [1, 0]), ([[50, 50]], [1])]
    expected = [net_x(net, imgs[i], *clicks[i]) for i in range(2)]
    predictor = SAMPOPredictor(net, cache_size=4)
    errors, barrier = [], threading.Barrier(2)

    def worker(i):
        try:
            barrier.wait()
            for _ in range(5):
                predictor.set_image(imgs[i], f"img{i}")
                out = predictor.predict(*clicks[i])
                if not torch.allclose(out, expected[i], atol=1e-5):
                    errors.append(f"image {i}: another image's mask")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(predictor.cache) == 2
    assert predictor.misses <= 4 and predictor.hits + predictor.misses == 10


def test_predictor_rejects_what_it_cannot_split():
    with pytest.raises(TypeError, match="needs a PromptableSAM"):
        SAMPOPredictor(torch.nn.Linear(2, 2))
    predictor = SAMPOPredictor(PromptableSAM("tiny", S, lora_rank=0))
    with pytest.raises(ValueError, match=r"expected an image \(3, H, W\)"):
        predictor.set_image(torch.zeros(1, S, S))
