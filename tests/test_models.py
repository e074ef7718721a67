"""Model zoo: registry contract for every model, exact parameter counts, and parity with timm's own outputs."""

import json
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lanes import fast_only

from patient.models import apply, create, describe, list_models, param_count
from patient.models.weights import WeightsError, named_tensors

# One name per family in the fast lane.
FAST_NAMES = ("cifar_resnet20", "resnet18", "bit_r26x1_cifar", "mobilenetv3_small_050", "regnety_002",
              "deit_tiny_distilled_patch16_224")

FIXTURES = Path(__file__).parent / "fixtures"
FEATURES = {"stem", "stage1", "stage2", "stage3", "pre_logits"}

# Counts printed by timm 1.0.31 (`sum(p.numel() for p in timm.create_model(name).parameters())`, 1000 classes).
TIMM_PARAMS = {
    "bit_r50x1": 25_549_352,  # resnetv2_50x1_bit
    "resnet50": 25_557_032,
    "resnet18": 11_689_512,
    "mobilenetv3_large_100": 5_483_032,
    "mobilenetv3_small_100": 2_542_856,
    "mobilenetv3_small_050": 1_593_224,
    # timm.create_model(name, num_classes=1000) for every regnety_* name (counted on the meta device)
    "regnety_002": 3_162_996, "regnety_004": 4_344_144, "regnety_006": 6_055_160, "regnety_008": 6_263_168,
    "regnety_016": 11_202_430, "regnety_032": 19_436_338, "regnety_040": 20_646_656, "regnety_064": 30_583_252,
    "regnety_080": 39_180_068, "regnety_120": 51_822_544, "regnety_160": 83_590_140, "regnety_320": 145_046_770,
    # timm.create_model(name) for every ViT / DeiT name (meta device)
    "vit_tiny_patch16_224": 5_717_416, "vit_small_patch16_224": 22_050_664, "vit_base_patch16_224": 86_567_656,
    "deit_tiny_patch16_224": 5_717_416, "deit_small_patch16_224": 22_050_664, "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800, "deit_small_distilled_patch16_224": 22_436_432,
}


def test_registry_lists_all_families():
    names = list_models()
    assert len(names) >= 18
    for family in ("bit_", "resnet", "cifar_resnet", "mobilenetv3_small", "mobilenetv3_large", "resnet8x4", "regnety_",
                   "vit_", "deit_"):
        assert any(n.startswith(family) for n in names), family


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_param_count_equals_timm(name):
    model, _ = create(name, key=None, num_classes=1000)  # a zero-filled skeleton: no random init
    assert param_count(model) == TIMM_PARAMS[name]


def _small(name):
    """Registry arguments with one block per stage, so every model compiles in seconds; widths, stems and blocks stay."""
    kw = describe(name).kwargs
    if "depth" in kw:  # transformers: two blocks
        return {"depth": 2}
    return {"depths": (1,) * len(kw["depths"])} if "depths" in kw else {}


@pytest.mark.parametrize("name", fast_only(list_models(), keep=FAST_NAMES))
def test_contract_shapes(name):
    """Every registry model, full depth, traced abstractly: logits and named features of the right shapes."""
    model, state = create(name, num_classes=7, key=None)  # zero-filled skeleton: no random work for big models
    x = jax.ShapeDtypeStruct((2, 3, 64, 64), jnp.float32)
    for train in (True, False):
        logits, feats, new_state = jax.eval_shape(lambda m, s, x: apply(m, s, x, train=train), model, state, x)
        assert logits.shape == (2, 7)
        assert FEATURES <= set(feats) and feats["pre_logits"].shape[0] == 2
        assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


def _distinct_small():
    """Registry names whose one-block-per-stage network differs in structure from every earlier name's: bit_r50x1 and
    bit_r152x1 differ only in depth, bit_r50x1 and bit_r50x3 (or MobileNetV3 0.75x and 1.0x, or the RegNetYs) only in
    channel and group widths, which change no code path (the widths' rounding is checked by the parameter counts and
    test_contract_shapes), so each structure is compiled once."""
    seen, names = set(), []
    for name in list_models():
        e = describe(name)
        widths = ("width", "widths", "group_sizes", "embed_dim", "num_heads")
        kwargs = {k: v for k, v in {**e.kwargs, **_small(name)}.items() if k not in widths}
        config = (e.family, repr(sorted(kwargs.items())))
        if config not in seen:
            seen.add(config)
            names.append(name)
    return names


# Every distinct registry network with one block per stage (widths, stems, block kinds and norms as registered);
# each compiles one jitted train + eval forward. (test_contract_shapes covers every name at full depth.)
# One small structure in the fast lane; every other one (seconds to a minute of compilation each) in the slow one.
@pytest.mark.parametrize("name", fast_only(_distinct_small(), keep=()))
def test_contract_numeric(name, getkey):
    model, state = create(name, num_classes=7, key=getkey(), **_small(name))
    res = 32
    x = jax.random.uniform(getkey(), (2, 3, res, res))
    # Random non-zero values everywhere: zero-initialised heads and last convs would hide missing gradient paths.
    leaves, treedef = jax.tree_util.tree_flatten(eqx.filter(model, eqx.is_array))
    keys = jax.random.split(getkey(), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    model = eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), eqx.filter(model, eqx.is_array, inverse=True))
    params, static = eqx.partition(model, eqx.is_array)
    traces = []

    @jax.jit
    def step(params, state, x):
        traces.append(1)

        def loss(p):
            logits, feats, new_state = apply(eqx.combine(p, static), state, x, train=True)
            return jnp.sum(jax.nn.log_softmax(logits)[:, 0]) + sum(jnp.mean(f) for f in feats.values()) * 0, (
                logits, feats, new_state)

        (value, aux), g = jax.value_and_grad(loss, has_aux=True)(params)
        eval_logits = apply(eqx.combine(params, static), state, x, train=False)[0]
        return value, aux, g, eval_logits

    value, (logits, feats, new_state), grads, eval_logits = step(params, state, x)
    step(params, state, x + 0.1)
    assert len(traces) == 1, "the jitted forward must compile once for repeated calls"
    assert logits.shape == (2, 7) and eval_logits.shape == (2, 7)
    assert FEATURES <= set(feats) and feats["pre_logits"].shape[0] == 2
    for v in [value, logits, eval_logits, *feats.values()]:
        assert bool(jnp.all(jnp.isfinite(v)))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    zero = [jax.tree_util.keystr(p) for p, g in flat if not bool(jnp.any(g != 0))]
    assert not zero, f"leaves without gradient: {zero}"
    assert set(new_state) == set(state)
    if state:  # BatchNorm models: training updates running statistics, evaluation does not touch them
        changed = [k for k in state if not np.allclose(new_state[k]["mean"], state[k]["mean"])]
        assert changed


CASES = ["bit_tiny", "resnet_bottleneck_tiny", "resnet_basic_tiny", "mobilenetv3_small_050", "mobilenetv3_large_075",
         "regnety_tiny", "vit_tiny", "deit_distilled_tiny", "vit_resampled"]


def _fixture(case):
    z = np.load(FIXTURES / f"{case}.npz", allow_pickle=False)
    return z["x"], z["logits"], str(z["name"]), json.loads(str(z["overrides"]))


@pytest.mark.parametrize("case", CASES)
def test_timm_parity(case):
    x, want, name, overrides = _fixture(case)
    model, state = create(name, key=jax.random.key(0), num_classes=10, weights=FIXTURES / f"{case}.safetensors", **overrides)
    logits = np.asarray(eqx.filter_jit(apply)(model, state, x)[0])
    assert np.max(np.abs(logits - want)) <= 1e-4


def test_bit_legacy_npz_equals_safetensors():
    x, _, name, overrides = _fixture("bit_tiny")
    a = create(name, key=jax.random.key(0), num_classes=10, weights=FIXTURES / "bit_tiny.safetensors", **overrides)
    b = create(name, key=jax.random.key(0), num_classes=10, weights=FIXTURES / "bit_tiny_legacy.npz", **overrides)
    fwd = eqx.filter_jit(apply)
    la, lb = np.asarray(fwd(*a, x)[0]), np.asarray(fwd(*b, x)[0])
    assert np.max(np.abs(la - lb)) <= 1e-5


def test_big_vision_npz_layout(tmp_path):
    """big_vision's converted BiT layout, written from the legacy file by an independent key mapping."""
    legacy = np.load(FIXTURES / "bit_tiny_legacy.npz", allow_pickle=False)
    out = {}
    for k in legacy.files:
        v = legacy[k]
        k = k[len("resnet/"):]
        if k.startswith("root_block"):
            out["root_block/conv_root/kernel"] = v
        elif k.startswith("group_norm/"):
            out[f"norm-pre-head/{'scale' if k.endswith('gamma') else 'bias'}"] = v
        elif k == "head/conv2d/kernel":
            out["head/kernel"] = v.reshape(v.shape[-2:])  # 1x1 conv HWIO -> Dense (C, K)
        elif k == "head/conv2d/bias":
            out["head/bias"] = v
        else:
            block, unit, abc, *rest = k.split("/")
            pre = f"{block}/{unit}/"
            if rest[0] == "proj":
                out[pre + "conv_proj/kernel"] = v
            else:
                i = "abc".index(abc) + 1
                if rest[0] == "standardized_conv2d":
                    out[pre + f"conv{i}/kernel"] = v
                else:
                    out[pre + f"gn{i}/{'scale' if rest[1] == 'gamma' else 'bias'}"] = v
    np.savez(tmp_path / "bv.npz", **out)
    x, want, name, overrides = _fixture("bit_tiny")
    model, state = create(name, key=jax.random.key(0), num_classes=10, weights=tmp_path / "bv.npz", **overrides)
    assert np.max(np.abs(np.asarray(eqx.filter_jit(apply)(model, state, x)[0]) - want)) <= 1e-4


def test_head_with_other_class_count_is_reinitialised():
    x, _, name, overrides = _fixture("resnet_basic_tiny")
    with pytest.warns(UserWarning, match="re-initialised"):
        model, state = create(name, key=jax.random.key(0), num_classes=3,
                              weights=FIXTURES / "resnet_basic_tiny.safetensors", **overrides)
    ref, _ = create(name, key=jax.random.key(0), num_classes=10, weights=FIXTURES / "resnet_basic_tiny.safetensors", **overrides)
    assert model.fc.weight.shape == (3, 128)
    np.testing.assert_array_equal(model.conv1.weight, ref.conv1.weight)


def test_wrong_architecture_weights_are_a_clear_error():
    with pytest.raises(WeightsError, match=r"resnet_basic_tiny\.safetensors: .*another architecture"):
        create("mobilenetv3_small_050", key=jax.random.key(0), num_classes=10, weights=FIXTURES / "resnet_basic_tiny.safetensors")
    with pytest.raises(WeightsError, match="BiT .npz cannot initialise resnet18"):
        create("resnet18", key=jax.random.key(0), num_classes=10, weights=FIXTURES / "bit_tiny_legacy.npz")
    with pytest.raises(FileNotFoundError, match="nope.safetensors: weights file not found"):
        create("resnet18", key=jax.random.key(0), num_classes=10, weights="nope.safetensors")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet7'.*list_models"):
        create("resnet7", key=jax.random.key(0), num_classes=10)


def test_named_tensors_round_trip_through_safetensors(tmp_path, getkey):
    from safetensors.numpy import save_file

    model, state = create("mobilenetv3_small_050", num_classes=5, key=getkey())
    tensors = {k: np.asarray(v) for k, v in named_tensors(model, state).items()}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m2, s2 = create("mobilenetv3_small_050", num_classes=5, key=getkey(), weights=tmp_path / "w.safetensors")
    for a, b in zip(jax.tree_util.tree_leaves((model, state)), jax.tree_util.tree_leaves((m2, s2))):
        np.testing.assert_array_equal(a, b)


def test_vit_weights_of_another_grid_are_resampled():
    """Weights made for an 8x8 grid of patches, loaded into a model built for 10x10, get their position embeddings
    resampled as timm's checkpoint filter does: the reference is timm running the 8x8 model on 80 px images (the
    same resampling, at run time)."""
    x, want, name, overrides = _fixture("vit_resampled")
    model, state = create(name, key=jax.random.key(0), num_classes=10, weights=FIXTURES / "vit_resampled.safetensors",
                          **{**overrides, "resolution": 80})
    assert model.pos_embed.shape == (1, 1 + 10 * 10, 48) and model.grid == (10, 10)
    assert np.max(np.abs(np.asarray(eqx.filter_jit(apply)(model, state, x)[0]) - want)) <= 1e-4


def test_distilled_heads_are_both_reinitialised_and_both_reach_the_features():
    x, want, name, overrides = _fixture("deit_distilled_tiny")
    with pytest.warns(UserWarning, match="re-initialised"):
        model, state = create(name, key=jax.random.key(0), num_classes=3,
                              weights=FIXTURES / "deit_distilled_tiny.safetensors", **overrides)
    assert model.head.weight.shape == model.head_dist.weight.shape == (3, 48)
    logits, feats, _ = apply(model, state, x)
    np.testing.assert_allclose(logits, (feats["head_cls"] + feats["head_dist"]) / 2, rtol=1e-6, atol=1e-6)


def test_transformer_input_must_be_a_multiple_of_the_patch():
    model, state = create("deit_tiny_patch16_224", num_classes=3, key=None, depth=1)
    with pytest.raises(ValueError, match="input 40x40 is not a multiple of the patch size 16"):
        apply(model, state, np.zeros((1, 3, 40, 40), np.float32))
    with pytest.raises(ValueError, match="resolution 40 is not a multiple of the patch size 16"):
        create("deit_tiny_patch16_224", num_classes=3, key=None, resolution=40)
