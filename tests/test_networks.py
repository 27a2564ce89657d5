"""stylegan/networks.py: the state-dict contract, hand-computed layer outputs, mapping and
truncation rules, noise modes, style routing, discriminator features and gradients (tiny nets)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stylegan import networks as nw
from stylegan import ops
from stylegan.errors import UserError
from stylegan.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig

BASE, CMAX = 256, 32  # channels: 4 -> 32, 8 -> 32, 16 -> 16, 32 -> 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP barriers stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_g(**overrides) -> Generator:
    kwargs = dict(z_dim=16, w_dim=24, img_resolution=32, channel_base=BASE, channel_max=CMAX,
                  mapping_layers=2)
    kwargs.update(overrides)
    return Generator(GeneratorConfig(**kwargs))


def small_d(**overrides) -> Discriminator:
    kwargs = dict(img_resolution=32, channel_base=BASE, channel_max=CMAX)
    kwargs.update(overrides)
    return Discriminator(DiscriminatorConfig(**kwargs))


def ch(res: int) -> int:
    return min(BASE // res, CMAX)


# ------------------------------------------------------------------ state-dict contract


def expected_g_keys(*, z_dim, c_dim, w_dim, res, layers, img_channels=3):
    keys = {"mapping.w_avg": (w_dim,)}
    features = [z_dim + (w_dim if c_dim else 0)] + [w_dim] * layers
    if c_dim:
        keys.update({"mapping.embed.weight": (w_dim, c_dim), "mapping.embed.bias": (w_dim,)})
    for i in range(layers):
        keys[f"mapping.fc{i}.weight"] = (features[i + 1], features[i])
        keys[f"mapping.fc{i}.bias"] = (features[i + 1],)

    def layer(prefix, cin, cout, r):
        keys.update({f"{prefix}.weight": (cout, cin, 3, 3), f"{prefix}.bias": (cout,),
                     f"{prefix}.noise_strength": (), f"{prefix}.affine.weight": (cin, w_dim),
                     f"{prefix}.affine.bias": (cin,), f"{prefix}.noise_const": (r, r),
                     f"{prefix}.resample_filter": (4, 4)})

    r = 4
    while r <= res:
        b = f"synthesis.b{r}"
        keys[f"{b}.resample_filter"] = (4, 4)
        if r == 4:
            keys[f"{b}.const"] = (ch(4), 4, 4)
        else:
            layer(f"{b}.conv0", ch(r // 2), ch(r), r)
        layer(f"{b}.conv1", ch(r), ch(r), r)
        keys.update({f"{b}.torgb.weight": (img_channels, ch(r), 1, 1),
                     f"{b}.torgb.bias": (img_channels,),
                     f"{b}.torgb.affine.weight": (ch(r), w_dim),
                     f"{b}.torgb.affine.bias": (ch(r),)})
        r *= 2
    return keys


def expected_d_keys(*, c_dim, res, cmap_dim, layers=8, img_channels=3):
    keys = {}

    def conv(prefix, cin, cout, k, bias=True):
        keys[f"{prefix}.weight"] = (cout, cin, k, k)
        keys[f"{prefix}.resample_filter"] = (4, 4)
        if bias:
            keys[f"{prefix}.bias"] = (cout,)

    r = res
    while r >= 8:
        keys[f"b{r}.resample_filter"] = (4, 4)
        if r == res:
            conv(f"b{r}.fromrgb", img_channels, ch(r), 1)
        conv(f"b{r}.conv0", ch(r), ch(r), 3)
        conv(f"b{r}.conv1", ch(r), ch(r // 2), 3)
        conv(f"b{r}.skip", ch(r), ch(r // 2), 1, bias=False)
        r //= 2
    conv("b4.conv", ch(4) + 1, ch(4), 3)
    out = cmap_dim if c_dim else 1
    keys.update({"b4.fc.weight": (ch(4), ch(4) * 16), "b4.fc.bias": (ch(4),),
                 "b4.out.weight": (out, ch(4)), "b4.out.bias": (out,)})
    if c_dim:
        keys.update({"mapping.embed.weight": (cmap_dim, c_dim), "mapping.embed.bias": (cmap_dim,)})
        for i in range(layers):
            keys[f"mapping.fc{i}.weight"] = (cmap_dim, cmap_dim)
            keys[f"mapping.fc{i}.bias"] = (cmap_dim,)
    return keys


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("c_dim", [0, 5])
def test_generator_state_dict_contract(c_dim):
    G = small_g(c_dim=c_dim)
    assert shapes(G) == expected_g_keys(z_dim=16, c_dim=c_dim, w_dim=24, res=32, layers=2)
    assert set(dict(G.named_buffers())) == {k for k in shapes(G) if k.endswith(
        ("w_avg", "noise_const", "resample_filter"))}


@pytest.mark.parametrize("c_dim", [0, 5])
def test_discriminator_state_dict_contract(c_dim):
    D = small_d(c_dim=c_dim, mapping_layers=3)
    assert shapes(D) == expected_d_keys(c_dim=c_dim, res=32, cmap_dim=ch(4), layers=3)


def test_strict_load_reproduces_outputs():
    G1, G2 = small_g(), small_g()
    G2.load_state_dict(G1.state_dict(), strict=True)
    z = torch.randn(2, 16)
    assert torch.equal(G1(z, None), G2(z, None))
    D1, D2 = small_d(), small_d()
    D2.load_state_dict(D1.state_dict(), strict=True)
    img = torch.randn(4, 3, 32, 32)
    assert torch.equal(D1(img, None), D2(img, None))


def test_initialisation():
    G = small_g()
    sd = G.state_dict()
    assert torch.all(sd["synthesis.b8.conv0.affine.bias"] == 1)
    assert torch.all(sd["synthesis.b8.torgb.affine.bias"] == 1)
    assert torch.all(sd["synthesis.b8.conv0.bias"] == 0)
    assert torch.all(sd["mapping.fc0.bias"] == 0)
    assert sd["synthesis.b8.conv0.noise_strength"].item() == 0
    assert torch.all(sd["mapping.w_avg"] == 0)
    # mapping weights are stored as randn / lr_multiplier (0.01)
    assert 70 < sd["mapping.fc1.weight"].std().item() < 130
    assert 0.7 < sd["synthesis.b16.conv0.weight"].std().item() < 1.3
    assert torch.allclose(sd["synthesis.b8.resample_filter"].sum(), torch.tensor(1.0))


@pytest.mark.parametrize(("res", "num_ws"), [(8, 4), (16, 6), (32, 8), (64, 10), (256, 14)])
def test_num_ws(res, num_ws):
    assert nw.SynthesisNetwork(8, res, 3, channel_base=1024, channel_max=4).num_ws == num_ws
    assert num_ws == 2 * int(math.log2(res)) - 2


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="power of two"):
        small_g(img_resolution=48)
    with pytest.raises(UserError, match="architecture"):
        small_d(architecture="dense")
    with pytest.raises(UserError, match="map-depth"):
        small_g(mapping_layers=0)


def test_z_from_seed_matches_numpy():
    z = nw.z_from_seed(42, 512)
    assert z.dtype == torch.float32 and z.shape == (1, 512)
    assert np.array_equal(z.numpy(), np.random.RandomState(42).randn(1, 512).astype(np.float32))


# ------------------------------------------------------------------ layers, hand-computed


def test_fc_equalized_lr_hand_values():
    fc = nw.FullyConnectedLayer(4, 2, activation="lrelu", lr_multiplier=0.01, bias_init=1)
    with torch.no_grad():
        fc.weight.fill_(1.0)
    # weight gain 0.01 / sqrt(4) = 0.005; x sums to +-10 -> +-0.05; bias 1 * 0.01
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]])
    out = fc(x)
    assert torch.allclose(out[0], torch.full([2], 0.06 * math.sqrt(2)))
    assert torch.allclose(out[1], torch.full([2], -0.04 * 0.2 * math.sqrt(2)))


def test_conv_layer_gain_and_clamp():
    conv = nw.Conv2dLayer(2, 1, 3, activation="lrelu")
    with torch.no_grad():
        conv.weight.fill_(1.0)
    out = conv(torch.ones(1, 2, 5, 5))
    # interior: 18 taps / sqrt(2 * 9) = sqrt(18), lrelu gain sqrt(2) -> 6;
    # edge: 12 / sqrt(18) * sqrt(2) = 4
    assert out[0, 0, 2, 2].item() == pytest.approx(6.0)
    assert out[0, 0, 0, 2].item() == pytest.approx(4.0)
    clamped = nw.Conv2dLayer(2, 1, 3, activation="lrelu", conv_clamp=2.0)
    clamped.load_state_dict(conv.state_dict())
    out = clamped(torch.ones(1, 2, 5, 5), gain=math.sqrt(0.5))
    # the extra gain also scales the clamp: min(6 * sqrt(.5), 2 * sqrt(.5))
    assert out.max().item() == pytest.approx(2 * math.sqrt(0.5))


def _unit_synthesis_layer(**kwargs) -> nw.SynthesisLayer:
    layer = nw.SynthesisLayer(2, 1, 3, 5, **kwargs)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.affine.weight.zero_()  # styles = affine bias = 1
    return layer


def test_synthesis_layer_hand_values_and_noise():
    layer = _unit_synthesis_layer()
    x, w = torch.ones(1, 2, 5, 5), torch.randn(1, 3)
    # demodulated: 18 / sqrt(18) inside, 12 / sqrt(18) on an edge; then lrelu gain sqrt(2)
    out = layer(x, w, noise_mode="none")
    assert out[0, 0, 2, 2].item() == pytest.approx(6.0)
    assert out[0, 0, 0, 2].item() == pytest.approx(4.0)
    assert out[0, 0, 0, 0].item() == pytest.approx(8 / 3)
    # noise_strength 0: 'const' == 'none'; otherwise const noise is added before bias + act
    assert torch.equal(layer(x, w, noise_mode="const"), out)
    with torch.no_grad():
        layer.noise_strength.fill_(0.5)
    const = layer(x, w, noise_mode="const")
    assert torch.allclose(const - out, 0.5 * layer.noise_const * math.sqrt(2), atol=1e-5)
    assert torch.equal(const, layer(x, w, noise_mode="const"))
    assert not torch.allclose(layer(x, w, noise_mode="random"), layer(x, w, noise_mode="random"))
    with pytest.raises(AssertionError):
        layer(x, w, noise_mode="off")


def test_synthesis_layer_clamp():
    layer = _unit_synthesis_layer(conv_clamp=5.0)
    out = layer(torch.ones(1, 2, 5, 5), torch.randn(1, 3), noise_mode="none")
    assert out.max().item() == pytest.approx(5.0)
    assert out[0, 0, 0, 2].item() == pytest.approx(4.0)


def test_torgb_hand_values():
    torgb = nw.ToRGBLayer(2, 3, 4)
    with torch.no_grad():
        torgb.weight.fill_(1.0)
        torgb.affine.weight.zero_()
    # styles = 1 / sqrt(2); no demodulation: 2 / sqrt(2)
    out = torgb(torch.ones(1, 2, 4, 4), torch.randn(1, 4))
    assert torch.allclose(out, torch.full([1, 3, 4, 4], math.sqrt(2)))


def test_demodulated_layer_ignores_style_scale_torgb_does_not():
    torch.manual_seed(0)
    layer = nw.SynthesisLayer(4, 3, 6, 8, up=2)
    torgb = nw.ToRGBLayer(3, 3, 6)
    x, w = torch.randn(2, 4, 4, 4), torch.randn(2, 6)
    base = layer(x, w, noise_mode="none")
    rgb = torgb(base, w)
    with torch.no_grad():
        for affine in (layer.affine, torgb.affine):
            affine.weight.mul_(7)
            affine.bias.mul_(7)
    assert torch.allclose(layer(x, w, noise_mode="none"), base, atol=1e-5)
    assert torch.allclose(torgb(base, w), 7 * rgb, atol=1e-4)


# ------------------------------------------------------------------ mapping network


def test_mapping_normalises_z_and_broadcasts():
    G = small_g()
    z = torch.randn(3, 16)
    ws = G.mapping(z, None)
    assert ws.shape == (3, G.num_ws, 24)
    assert torch.equal(ws[:, 0], ws[:, -1])
    assert torch.allclose(G.mapping(5 * z, None), ws, atol=1e-5)


def test_mapping_hand_computed_one_layer():
    m = nw.MappingNetwork(2, 0, 2, num_ws=1, num_layers=1, lr_multiplier=0.5)
    with torch.no_grad():
        m.fc0.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        m.fc0.bias.copy_(torch.tensor([2.0, 0.0]))
    # z [3, 4] -> normalised [3, 4] / sqrt(12.5); weight gain 0.5 / sqrt(2); bias gain 0.5
    zn = torch.tensor([3.0, 4.0]) / math.sqrt(12.5)
    pre = torch.tensor([zn[0] * 0.5 / math.sqrt(2) + 1.0, -zn[1] * 0.5 / math.sqrt(2)])
    expected = torch.where(pre > 0, pre, 0.2 * pre) * math.sqrt(2)
    assert torch.allclose(m(torch.tensor([[3.0, 4.0]]), None)[0, 0], expected, atol=1e-6)


def test_truncation_rules():
    G = small_g()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(24))
    z = torch.randn(2, 16)
    ws = G.mapping(z, None)
    w_avg = G.mapping.w_avg
    assert torch.allclose(G.mapping(z, None, truncation_psi=0), w_avg.expand_as(ws), atol=1e-6)
    assert torch.equal(G.mapping(z, None, truncation_psi=1), ws)
    half = G.mapping(z, None, truncation_psi=0.5)
    assert torch.allclose(half, w_avg + 0.5 * (ws - w_avg), atol=1e-6)
    cut = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=3)
    assert torch.allclose(cut[:, :3], half[:, :3], atol=1e-6)
    assert torch.equal(cut[:, 3:], ws[:, 3:])


def test_w_avg_update_formula():
    G = small_g()
    start = torch.randn(24)
    with torch.no_grad():
        G.mapping.w_avg.copy_(start)
    z = torch.randn(4, 16)
    G.mapping(z, None)
    assert torch.equal(G.mapping.w_avg, start)  # no update unless asked
    ws = G.mapping(z, None, update_emas=True)
    expected = 0.998 * start + 0.002 * ws[:, 0].mean(dim=0)
    assert torch.allclose(G.mapping.w_avg, expected, atol=1e-6)


def test_mapping_shape_asserts():
    G = small_g()
    with pytest.raises(AssertionError):
        G.mapping(torch.randn(2, 15), None)
    with pytest.raises(AssertionError):
        G.synthesis(torch.randn(2, G.num_ws - 1, 24))
    assert G.mapping(torch.randn(2, 16), torch.zeros(2, 0)).shape == (2, 8, 24)


# ------------------------------------------------------------------ synthesis network


def test_style_routing_shares_torgb_with_next_conv0():
    G = small_g()
    seen = {}
    for name, module in G.synthesis.named_modules():
        if name.endswith(".affine"):
            module.register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name[:-7], args[0][0, 0].item()))
    ws = torch.arange(G.num_ws, dtype=torch.float32)[None, :, None].repeat(1, 1, 24)
    G.synthesis(ws)
    assert seen == {"b4.conv1": 0, "b4.torgb": 1, "b8.conv0": 1, "b8.conv1": 2, "b8.torgb": 3,
                    "b16.conv0": 3, "b16.conv1": 4, "b16.torgb": 5, "b32.conv0": 5,
                    "b32.conv1": 6, "b32.torgb": 7}


def test_skip_image_is_sum_of_upsampled_torgbs():
    G = small_g(img_resolution=8)
    ws = G.mapping(torch.randn(2, 16), None)
    b4, b8 = G.synthesis.b4, G.synthesis.b8
    x, img4 = b4(None, None, ws[:, 0:2])
    _, img8 = b8(x, img4, ws[:, 1:4])
    assert torch.allclose(G.synthesis(ws), img8)
    rgb8 = b8.torgb(b8.conv1(b8.conv0(x, ws[:, 1]), ws[:, 2]), ws[:, 3])
    from stylegan import ops
    assert torch.allclose(img8, ops.upsample2d(img4, b8.resample_filter) + rgb8, atol=1e-5)


def test_generator_fused_equals_plain():
    torch.manual_seed(0)
    G = small_g()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
    z = torch.randn(3, 16)
    fused = G(z, None, fused_modconv=True)
    plain = G(z, None, fused_modconv=False)
    assert fused.shape == (3, 3, 32, 32)
    assert torch.allclose(fused, plain, atol=1e-5 * plain.abs().max().item())


def test_generator_noise_modes():
    G = small_g()
    z = torch.randn(2, 16)
    assert torch.equal(G(z, None, noise_mode="none"), G(z, None, noise_mode="const"))
    with torch.no_grad():
        G.synthesis.b16.conv1.noise_strength.fill_(0.5)
    const = G(z, None, noise_mode="const")
    assert not torch.allclose(const, G(z, None, noise_mode="none"))
    assert torch.equal(const, G(z, None, noise_mode="const"))
    assert not torch.allclose(G(z, None, noise_mode="random"), G(z, None, noise_mode="random"))


def test_generator_conv_clamp_clamps():
    G = small_g(img_resolution=8)
    clamped = small_g(img_resolution=8, conv_clamp=0.01)
    clamped.load_state_dict(G.state_dict())
    z = torch.randn(2, 16)
    assert not torch.allclose(G(z, None), clamped(z, None))
    # every toRGB output is clamped to 0.01 and the positive FIR keeps bounds: |img| <= 0.02
    assert clamped(z, None).abs().max().item() <= 0.02 + 1e-6


@pytest.mark.parametrize("architecture", ["orig", "resnet"])
def test_other_generator_architectures(architecture):
    G = small_g(architecture=architecture)
    assert G.num_ws == 8
    keys = set(G.state_dict())
    assert "synthesis.b32.torgb.weight" in keys and "synthesis.b16.torgb.weight" not in keys
    assert ("synthesis.b16.skip.weight" in keys) == (architecture == "resnet")
    img = G(torch.randn(2, 16), None)
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()


def test_conditional_generator():
    G = small_g(c_dim=4)
    c = torch.eye(4)[:3]
    img = G(torch.randn(3, 16), c)
    assert img.shape == (3, 3, 32, 32)
    z = torch.randn(1, 16).repeat(2, 1)
    ws = G.mapping(z, torch.eye(4)[:2])
    assert not torch.allclose(ws[0], ws[1])
    with pytest.raises(AssertionError):
        G(torch.randn(3, 16), None)


def test_fp16_setting_is_float32_on_cpu():
    G = small_g(num_fp16_res=2)
    ref = small_g()
    ref.load_state_dict(G.state_dict())
    z = torch.randn(2, 16)
    assert G(z, None).dtype == torch.float32
    assert torch.equal(G(z, None), ref(z, None))


def test_generator_gradients_reach_every_parameter():
    G = small_g(c_dim=3)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.1)
    G.train()
    img = G(torch.randn(2, 16), torch.eye(3)[:2], noise_mode="random")
    (img * torch.randn_like(img)).sum().backward()
    for name, p in G.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ discriminator


def test_discriminator_output_and_block_features():
    D = small_d()
    img = torch.randn(4, 3, 32, 32)
    logits = D(img, None)
    assert logits.shape == (4, 1)
    feats = D.block_features(img)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "b32": (4, ch(16), 16, 16), "b16": (4, ch(8), 8, 8), "b8": (4, ch(4), 4, 4),
        "b4.conv": (4, ch(4), 4, 4), "b4.fc": (4, ch(4))}
    assert torch.allclose(logits, D.b4.out(feats["b4.fc"]))
    with pytest.raises(AssertionError):
        D(torch.randn(4, 3, 16, 16), None)


def test_discriminator_resnet_block_hand_composition():
    D = small_d(conv_clamp=0.5)
    img = torch.randn(4, 3, 32, 32)
    b32 = D.b32
    x = b32.fromrgb(img)
    expected = (b32.skip(x, gain=math.sqrt(0.5))
                + b32.conv1(b32.conv0(x), gain=math.sqrt(0.5)))
    assert torch.allclose(D.block_features(img)["b32"], expected)
    # clamp 0.5 on conv0, 0.5 * sqrt(.5) on conv1 and skip
    assert expected.abs().max().item() <= 0.5 * math.sqrt(2) + 1e-6


def test_discriminator_uses_mbstd_groups():
    D = small_d(mbstd_group_size=2)
    img = torch.randn(4, 3, 32, 32)
    ref = D(img, None)
    # swapping samples 0 and 2 keeps the groups {0, 2}, {1, 3}: logits permute along
    assert torch.allclose(D(img[[2, 1, 0, 3]], None), ref[[2, 1, 0, 3]], atol=1e-6)
    # swapping 0 and 1 changes both groups' statistics
    assert not torch.allclose(D(img[[1, 0, 2, 3]], None), ref[[1, 0, 2, 3]], atol=1e-6)
    with pytest.raises(AssertionError, match="divisible"):
        D(torch.randn(3, 3, 32, 32), None)


def test_freezable_layers_order():
    D = small_d()
    layers = D.freezable_layers()
    expected = [D.b32.fromrgb, D.b32.conv0, D.b32.conv1, D.b32.skip,
                D.b16.conv0, D.b16.conv1, D.b16.skip, D.b8.conv0, D.b8.conv1, D.b8.skip,
                D.b4.conv, D.b4.fc, D.b4.out]
    assert len(layers) == 13 and all(a is b for a, b in zip(layers, expected))
    owned = {id(p) for layer in layers for p in layer.parameters()}
    mapping_free = {id(p) for p in D.parameters()}
    assert owned == mapping_free  # every parameter of an unconditional D is freezable


def test_conditional_discriminator_projection():
    D = small_d(c_dim=3, cmap_dim=8, mapping_layers=2)
    img, c = torch.randn(4, 3, 32, 32), torch.eye(3)[[0, 1, 2, 0]]
    logits = D(img, c)
    assert logits.shape == (4, 1)
    out = D._trunk(img, force_fp32=False)["b4.out"]  # [4, 8]
    cmap = D.mapping(None, c)
    assert cmap.shape == (4, 8)
    assert torch.allclose(logits, (out * cmap).sum(1, keepdim=True) / math.sqrt(8), atol=1e-6)
    assert set(D.block_features(img, c)) == {"b32", "b16", "b8", "b4.conv", "b4.fc"}
    with pytest.raises(AssertionError):
        D(img, None)


def test_skip_discriminator():
    D = small_d(architecture="skip")
    keys = set(D.state_dict())
    assert {"b16.fromrgb.weight", "b4.fromrgb.weight"} <= keys and "b16.skip.weight" not in keys
    assert D(torch.randn(4, 3, 32, 32), None).shape == (4, 1)
    assert D.freezable_layers()[:3] == [D.b32.fromrgb, D.b32.conv0, D.b32.conv1]


def test_discriminator_gradients_reach_every_parameter():
    D = small_d(c_dim=2, mapping_layers=2)
    img = torch.randn(4, 3, 32, 32, requires_grad=True)
    D(img, torch.eye(2)[[0, 1, 0, 1]]).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    for name, p in D.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_second_order_gradients_for_r1_and_path_length():
    # R1 needs d/dparams of ||dD/dimg||^2; path length needs d/dparams of ||d(G.synthesis)/dws||.
    D = small_d()
    img = torch.randn(4, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(D(img, None).sum(), img, create_graph=True)
    grad.square().sum().backward()
    assert D.b32.conv1.weight.grad.abs().sum() > 0 and D.b4.fc.weight.grad.abs().sum() > 0
    G = small_g()
    G.train()  # plain modulated conv, as in training
    ws = G.mapping(torch.randn(2, 16), None).detach().requires_grad_(True)
    out = G.synthesis(ws, noise_mode="random")
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), ws, create_graph=True)
    grad.square().sum().backward()
    assert G.synthesis.b16.conv0.weight.grad.abs().sum() > 0
    assert G.synthesis.b32.torgb.affine.weight.grad.abs().sum() > 0


def test_float16_path_when_forced(monkeypatch):
    # The fp16 blocks run only on CUDA; force them here to check the path's dtype handling.
    monkeypatch.setattr(nw, "_compute_dtype", lambda use_fp16, force_fp32, device:
                        torch.float16 if use_fp16 and not force_fp32 else torch.float32)
    G = small_g(num_fp16_res=2, conv_clamp=256)
    z = torch.randn(2, 16)
    for fused in (True, False):
        half = G(z, None, fused_modconv=fused)
        full = G(z, None, force_fp32=True)
        assert half.dtype == torch.float32
        assert torch.allclose(half, full, atol=0.02 * full.abs().max().item())
        assert not torch.equal(half, full)
    D = small_d(num_fp16_res=2, conv_clamp=256)
    img = torch.randn(4, 3, 32, 32)
    feats = D.block_features(img)
    assert all(v.dtype == torch.float32 for v in feats.values())
    full = D(img, None, force_fp32=True)
    assert torch.allclose(D(img, None), full, atol=0.02 * full.abs().max().item())


def test_discriminator_skip_layer_is_not_clamped():
    # Official resnet D: fromrgb/conv0/conv1 honour conv_clamp, the 1x1 skip layer does not.
    D = nw.Discriminator(nw.DiscriminatorConfig(img_resolution=16, channel_base=64,
                                                channel_max=8, conv_clamp=0.5))
    block = D.b16
    assert block.skip.conv_clamp is None
    assert block.conv0.conv_clamp == 0.5 and block.conv1.conv_clamp == 0.5


# ------------------------------------------------------------------ fast paths vs reference paths


def _r1_and_pl_gradients(G, D, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Outputs of G (training mode) and D, and first- plus second-order parameter gradients."""
    torch.manual_seed(seed)
    G.zero_grad(set_to_none=True), D.zero_grad(set_to_none=True)
    ws = G.mapping(torch.randn(4, 16), None).detach().requires_grad_(True)
    img = G.synthesis(ws, noise_mode="random")  # [4, 3, 32, 32]
    (grad_ws,) = torch.autograd.grad((img * torch.randn_like(img)).sum(), ws, create_graph=True)
    logits = D(img, None)
    (grad_img,) = torch.autograd.grad(logits.sum(), img, create_graph=True)
    (grad_ws.square().sum() + grad_img.square().sum() + logits.sum()).backward()
    g_grads = {n: p.grad.clone() for n, p in G.named_parameters() if p.grad is not None}
    d_grads = {n: p.grad.clone() for n, p in D.named_parameters()}
    return img.detach(), logits.detach(), g_grads, d_grads


@pytest.mark.parametrize("architecture", ["skip", "resnet"])
def test_fast_paths_equal_reference_paths_through_double_backward(architecture):
    """G and D with every fast op (channels-last FIR, fused bias_act, noise in the demodulation
    pass) against the plain reference ops: outputs and R1/path-length gradients."""
    G = small_g(architecture=architecture, conv_clamp=0.5).train()
    D = small_d(architecture=architecture, conv_clamp=0.5)
    fast = _r1_and_pl_gradients(G, D, seed=5)
    with ops.reference_paths():
        ref = _r1_and_pl_gradients(G, D, seed=5)
    assert torch.allclose(fast[0], ref[0], atol=1e-5) and torch.allclose(fast[1], ref[1], atol=1e-5)
    for fast_grads, ref_grads in zip(fast[2:], ref[2:]):
        assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) > 10
        for name, g in fast_grads.items():  # float rounding: ~1e-6 of the gradient's norm
            assert (g - ref_grads[name]).norm() <= 1e-4 * ref_grads[name].norm(), name
