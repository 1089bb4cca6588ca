"""GeneratorAdapter: tracing built-in and user-style generators, refusals, sampling, loading."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import SkipToOutput, VectorLatentGenerator
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from flipad import GeneratorAdapter, NotInvertibleError, load_generator
from flipad.generators.architectures import BUILTIN_GENERATORS
from flipad.io.data import DataError
from flipad.generators.loading import GeneratorLoadError

SMALL = dict(latent_dim=16, channels=1, image_size=32, width=8)
EXPECTED_FINAL = {
    "dcgan": nn.ConvTranspose2d,
    "wgan-gp": nn.ConvTranspose2d,
    "lsgan": nn.Conv2d,
    "ebgan": nn.ConvTranspose2d,
}


def _check_consistent(adapter: GeneratorAdapter) -> None:
    """The captured penultimate activation reproduces the output through s(A z + b)."""
    latents = adapter.sample_latents(3, seed=5)
    acts, outs = adapter.penultimate(latents)
    op = adapter.linear_map
    with torch.no_grad():
        again = adapter.activation.forward(op.forward(acts) + op.bias_map(torch.device("cpu")))
    assert torch.allclose(again, outs, atol=1e-5)


@pytest.mark.parametrize("name", list(EXPECTED_FINAL))
@pytest.mark.parametrize("size", [dict(channels=1, image_size=32), dict(channels=3, image_size=64)])
def test_builtin_image_generators_are_traced(name, size):
    module = BUILTIN_GENERATORS[name](latent_dim=100, width=8, **size)
    adapter = GeneratorAdapter.from_module(module, device="cpu", anchor_samples=64)
    assert isinstance(adapter.linear_map.layer, EXPECTED_FINAL[name])
    assert adapter.activation.name == "tanh"
    assert adapter.output_shape == (size["channels"], size["image_size"], size["image_size"])
    assert adapter.penultimate_bounds == (0.0, None)  # a ReLU feeds the final layer
    _check_consistent(adapter)


def test_paper_sized_dcgan_has_paper_shapes():
    adapter = GeneratorAdapter.from_module(BUILTIN_GENERATORS["dcgan"](), device="cpu", anchor_samples=8)
    assert adapter.latent_shape == (100, 1, 1)
    assert adapter.output_shape == (3, 64, 64)
    assert adapter.penultimate_shape == (64, 32, 32)


def test_mlp_generator_is_linear_plus_identity():
    adapter = GeneratorAdapter.from_module(BUILTIN_GENERATORS["mlp"](), device="cpu", anchor_samples=64)
    assert isinstance(adapter.linear_map.layer, nn.Linear)
    assert adapter.activation.name == "identity"
    assert not adapter.is_image
    rows = adapter.generate(5)
    assert rows.dtype == np.float32 and rows.shape == (5, 16)
    _check_consistent(adapter)


def test_user_module_with_vector_latent_and_sigmoid(vector_generator):
    sig = VectorLatentGenerator(out_activation=nn.Sigmoid()).eval()
    adapter = GeneratorAdapter.from_module(sig, latent_shape=(16,), device="cpu", anchor_samples=64)
    assert adapter.activation.name == "sigmoid" and adapter.activation.low == 0.0
    assert adapter.final_layer_name == "body.1.0"
    _check_consistent(adapter)
    tanh = GeneratorAdapter.from_module(vector_generator, latent_shape=(16,), device="cpu", anchor_samples=64)
    assert tanh.activation.name == "tanh"


class FunctionalTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4 * 8 * 8)
        self.up = nn.Upsample(scale_factor=2)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z):
        return torch.tanh(self.conv(self.up(torch.relu(self.fc(z)).view(-1, 4, 8, 8))))


def test_functional_activation_and_upsampling_conv():
    adapter = GeneratorAdapter.from_module(FunctionalTanh(), latent_shape=(8,), device="cpu", anchor_samples=32)
    assert adapter.final_layer_name == "conv" and adapter.activation.name == "tanh"
    assert adapter.output_shape == (3, 16, 16)
    _check_consistent(adapter)


class ReluOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU())

    def forward(self, z):
        return self.net(z)


class ClampOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, z):
        return self.fc(z).clamp(-0.1, 0.1)


@pytest.mark.parametrize(
    "module,message",
    [
        (SkipToOutput(), "skip connection"),
        (ReluOutput(), "ReLU"),
        (ClampOutput(), "not tanh, sigmoid or identity"),
    ],
)
def test_refuses_what_flipad_cannot_invert(module, message):
    with pytest.raises(NotInvertibleError, match=message):
        GeneratorAdapter.from_module(module, latent_shape=(8,), device="cpu")


def test_overrides(vector_generator):
    adapter = GeneratorAdapter.from_module(
        vector_generator, latent_shape=(16,), final_layer="body.1.0", activation="tanh", device="cpu"
    )
    assert adapter.final_layer_name == "body.1.0"
    with pytest.raises(NotInvertibleError, match="not sigmoid"):
        GeneratorAdapter.from_module(vector_generator, latent_shape=(16,), activation="sigmoid", device="cpu")
    with pytest.raises(NotInvertibleError, match="BatchNorm2d"):
        GeneratorAdapter.from_module(vector_generator, latent_shape=(16,), final_layer="body.0.1", device="cpu")


def test_anchor_is_the_mean_penultimate_activation(vector_generator):
    adapter = GeneratorAdapter.from_module(vector_generator, latent_shape=(16,), device="cpu", anchor_samples=300)
    acts, _ = adapter.penultimate(adapter.sample_latents(300, adapter.seed))
    assert torch.allclose(adapter.anchor, acts.mean(0), atol=1e-5)
    assert adapter.anchor.shape == adapter.penultimate_shape


def test_generated_images_are_exactly_what_a_png_stores(vector_generator):
    adapter = GeneratorAdapter.from_module(vector_generator, latent_shape=(16,), device="cpu", anchor_samples=16)
    images = adapter.generate(4, seed=3)
    assert images.dtype == np.uint8 and images.shape == (4, 1, 16, 16)
    floats = adapter.generate(4, seed=3, quantized=False)
    expected = np.floor((floats + 1) / 2 * 255 + 0.5).clip(0, 255)
    np.testing.assert_array_equal(images, expected)
    buf = io.BytesIO()
    Image.fromarray(images[0, 0]).save(buf, format="PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(buf)), images[0, 0])


def test_wrong_input_shape_names_both_shapes(vector_generator):
    adapter = GeneratorAdapter.from_module(vector_generator, latent_shape=(16,), device="cpu", anchor_samples=16)
    with pytest.raises(DataError, match=r"\(3, 16, 16\).*\(1, 16, 16\)"):
        adapter.invert(np.zeros((2, 3, 16, 16), dtype=np.uint8))


def test_load_generator_from_specs_and_weights(tmp_path):
    module = load_generator("dcgan", **SMALL)
    st = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(st))
    pt = tmp_path / "g.pt"
    torch.save(module.state_dict(), pt)
    for weights in (st, pt):
        again = load_generator("flipad.generators.architectures:DCGANGenerator", weights, **SMALL)
        for key, value in module.state_dict().items():
            assert torch.equal(again.state_dict()[key], value)
    factory = tmp_path / "my_gen.py"
    factory.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Sigmoid())\n"
    )
    user = load_generator(f"{factory}:make")
    adapter = GeneratorAdapter.from_module(user, latent_shape=(4,), device="cpu", anchor_samples=16)
    assert adapter.activation.name == "sigmoid"
    # a file whose module-level code needs its own module registered, as a dataclass config does
    configured = tmp_path / "configured_gen.py"
    configured.write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from torch import nn\n"
        "@dataclass(frozen=True)\n"
        "class Config:\n"
        "    width: int = 8\n"
        "def make(width: int = 8):\n"
        "    return nn.Sequential(nn.Linear(4, Config(width).width), nn.ReLU(), nn.Linear(width, 3), nn.Tanh())\n"
    )
    assert isinstance(load_generator(f"{configured}:make", width=6)[0], nn.Linear)


def test_unsafe_or_wrong_weights_are_refused(tmp_path):
    module = load_generator("dcgan", **SMALL)
    pickled = tmp_path / "whole_module.pt"
    torch.save(module, pickled)  # a pickled module, not a state dict
    with pytest.raises(GeneratorLoadError, match="safely"):
        load_generator("dcgan", pickled, **SMALL)
    other = tmp_path / "other.pt"
    torch.save(load_generator("lsgan", **SMALL).state_dict(), other)
    with pytest.raises(GeneratorLoadError, match="do not fit"):
        load_generator("dcgan", other, **SMALL)
    with pytest.raises(GeneratorLoadError, match="built-in name"):
        load_generator("stylegan9")
    with pytest.raises(GeneratorLoadError, match="does not exist"):
        load_generator("dcgan", tmp_path / "missing.pt", **SMALL)
