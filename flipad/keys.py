"""Keyed sampling: which recipient (user, session, deployment) made an image, with no loss of quality.

An owner who serves the generator draws each recipient's latents with a key (Gaussian Shading,
Yang et al., CVPR 2024, adapted): every latent entry ``z_i = s_i * |e_i|`` with ``e_i`` standard
normal and the sign ``s_i`` the ``i``-th bit of a ChaCha20 keystream (the ``cryptography``
package) under the recipient's key. A keystream bit is a fair coin independent of ``|e_i|``, so
each keyed latent is exactly N(0, I): the model's output distribution does not change. The key
is read back by inverting the image to its latent with the detector's search
(:class:`~flipad.detectors.reconstruction.LatentSearch`: the encoder's guess refined by
Levenberg-Marquardt to the quantisation floor) and comparing the signs with every registered
recipient's pattern. Entries the inversion leaves near zero carry no reliable sign and are not
read. Under "no key" (an unkeyed or foreign image), each read sign agrees with a recipient's
pattern as a fair coin, so the count of agreements is Binomial(read, 1/2): its tail is the
p-value, and an item matches a recipient only when that p-value times the number of recipients
is below the stated false-positive rate (1e-6 by default). Otherwise the answer is "no key".

Every recipient's message is its own key: the whole latent carries the recipient's keystream,
so all ``d`` entries vote on the one question decoding asks ("which registered recipient?"),
which is what a message replicated ``d / k`` times with a majority vote per bit approximates.

Keys: the owner's master secret (a file with owner-only permissions, an environment variable, or
a Prefect ``Secret`` block in the flows) derives each recipient's key by HKDF-SHA256 with the key
set's version and the recipient's name. Only names, versions and key ids (a hash of the derived
key, which reveals nothing of it) may be logged or written; a new key set is a new version, and
keys of older versions stay decodable from the same secret.

For comparison, :class:`DirectionKey` is Nie et al.'s latent fingerprint (ICML 2023): ``k``
message bits written as ``+-c`` along the latent directions that change the image least,
replacing the latent's own component there (a change of distribution by construction), decoded
from the same inversion.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import nn

from .inversion.amortised import LatentEncoder, levenberg_marquardt, quantisation_floor
from .io.data import quantize, to_output_range

__all__ = ["DirectionKey", "KeyMatch", "KeySet", "KeyedSampler", "SecretError", "best_matches", "check_secret", "invert",
           "read_secret_file", "recipient_names", "secret_from_environment"]

MIN_SECRET_BYTES = 16
DEFAULT_FPR = 1e-6
READ_THRESHOLD = 0.1  # |z| below this after inversion: the sign is not read
NONCE = bytes(16)  # ChaCha20's counter and nonce: each recipient key is used for one keystream only


class SecretError(ValueError):
    """A master secret that cannot be used, with what to do (never the secret itself)."""


def read_secret_file(path: str | os.PathLike) -> bytes:
    """The master secret in ``path``: refused in one line when missing, readable by others than
    its owner (mode bits for group or others), or shorter than 16 bytes."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SecretError(f"secret file {path} does not exist; create it with owner-only permissions "
                          "(head -c 32 /dev/urandom > FILE; chmod 600 FILE)") from None
    if not stat.S_ISREG(mode):
        raise SecretError(f"secret file {path} is not a regular file")
    if mode & 0o077:
        raise SecretError(f"secret file {path} is readable by others (mode {stat.S_IMODE(mode):03o}); "
                          f"run chmod 600 {path}")
    return check_secret(path.read_bytes(), f"secret file {path}")


SECRET_FILE_VARIABLE = "FLIPAD_KEY_SECRET_FILE"
SECRET_VARIABLE = "FLIPAD_KEY_SECRET"


def secret_from_environment() -> bytes | None:
    """The master secret named by the environment: the file ``$FLIPAD_KEY_SECRET_FILE`` (checked as
    :func:`read_secret_file` does), else the value of ``$FLIPAD_KEY_SECRET``; None when neither is set."""
    if os.environ.get(SECRET_FILE_VARIABLE):
        return read_secret_file(os.environ[SECRET_FILE_VARIABLE])
    if os.environ.get(SECRET_VARIABLE):
        return check_secret(os.environ[SECRET_VARIABLE].encode(), f"${SECRET_VARIABLE}")
    return None


def check_secret(secret: bytes, where: str = "the secret") -> bytes:
    """``secret`` if it is long enough to key the cipher, else a :class:`SecretError` naming ``where``."""
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(f"{where} holds {len(secret)} bytes; a master secret needs at least {MIN_SECRET_BYTES} "
                          "random bytes (head -c 32 /dev/urandom)")
    return secret


def recipient_names(spec: str | int | Sequence[str]) -> list[str]:
    """Recipient names: ``N`` (or an int) names ``r0001``...; a sequence is taken as given (stripped,
    blank lines skipped); names must be unique."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        count = int(spec)
        if count < 1:
            raise ValueError("the number of recipients must be at least 1")
        return [f"r{i:04d}" for i in range(1, count + 1)]
    names = [n.strip() for n in ([spec] if isinstance(spec, str) else spec) if n.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if not names or duplicates:
        raise ValueError(f"recipient names must be non-empty and unique (repeated: {', '.join(duplicates[:5])})")
    return names


@dataclass(frozen=True)
class KeyMatch:
    """What decoding says of one item: the recipient (None for "no key"), how many read signs
    agree with the best recipient's pattern, how many were read, and the p-value of that count
    under "no key" (before the correction for the number of recipients)."""

    recipient: str | None
    bits_correct: int
    bits_read: int
    p_value: float

    @property
    def bit_accuracy(self) -> float:
        return self.bits_correct / self.bits_read if self.bits_read else float("nan")


class KeySet:
    """The recipients of one key set version, their keys derived from the master secret.

    ``patterns`` (recipients x latent entries, +-1) stays in memory only; :meth:`public` is what
    may be logged (the version, each name and its key id).
    """

    def __init__(self, secret: bytes, recipients: Sequence[str], latent_dim: int, version: str = "1"):
        self._secret = check_secret(secret)
        self.recipients = recipient_names(recipients)
        self.latent_dim = int(latent_dim)
        self.version = str(version)
        keys = [self._key(name) for name in self.recipients]
        self.key_ids = [hashlib.sha256(b"flipad key id|" + key).hexdigest()[:16] for key in keys]
        self.patterns = torch.stack([self._pattern(key) for key in keys])

    def __repr__(self) -> str:  # never the secret
        return f"KeySet(version={self.version!r}, recipients={len(self.recipients)}, latent_dim={self.latent_dim})"

    def _key(self, recipient: str) -> bytes:
        info = f"flipad keyed sampling v1|{self.version}|{recipient}".encode()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._secret)

    def _pattern(self, key: bytes) -> torch.Tensor:
        """+-1 per latent entry: the bits of the recipient's ChaCha20 keystream."""
        encryptor = Cipher(algorithms.ChaCha20(key, NONCE), mode=None).encryptor()
        stream = np.frombuffer(encryptor.update(bytes(math.ceil(self.latent_dim / 8))), dtype=np.uint8)
        bits = np.unpackbits(stream)[: self.latent_dim]
        return torch.as_tensor(bits.astype(np.float32) * 2 - 1)

    def pattern(self, recipient: str) -> torch.Tensor:
        """The +-1 sign pattern of ``recipient``'s latents."""
        try:
            return self.patterns[self.recipients.index(recipient)]
        except ValueError:
            raise KeyError(f"no recipient {recipient!r} in key set version {self.version}") from None

    def public(self) -> dict:
        """What may be logged: the version and each recipient's name and key id, never a key."""
        return {"version": self.version, "latent_dim": self.latent_dim,
                "recipients": [{"name": n, "key_id": k} for n, k in zip(self.recipients, self.key_ids)]}

    def match(self, latents: torch.Tensor, fpr: float = DEFAULT_FPR, threshold: float = READ_THRESHOLD) -> list[KeyMatch]:
        """The best recipient of each inverted latent, matched only below ``fpr`` after the
        correction for the number of recipients."""
        flat = latents.detach().reshape(len(latents), -1).float().cpu()
        read = flat.abs() >= threshold
        signs = torch.sign(flat) * read
        agree = ((signs @ self.patterns.T) + read.sum(1, keepdim=True)) / 2  # per item and recipient
        best = agree.argmax(1)
        out = []
        for i, k in enumerate(best.tolist()):
            n, count = int(read[i].sum()), int(round(float(agree[i, k])))
            p = float(scipy.stats.binom.sf(count - 1, n, 0.5)) if n else 1.0
            matched = n > 0 and p * len(self.recipients) < fpr
            out.append(KeyMatch(self.recipients[k] if matched else None, count, n, p))
        return out


class KeyedSampler:
    """Draws a recipient's keyed samples of ``generator`` (what a serving application embeds).

    ``latents(recipient, n, seed)``: latents whose every entry is exactly N(0, 1), signed by the
    recipient's pattern; ``sample(...)``: the generator's 8-bit images of them (as a PNG stores).
    """

    def __init__(self, generator: nn.Module, latent_shape: Sequence[int], keys: KeySet,
                 output_range: tuple[float, float] = (-1.0, 1.0)):
        self.generator = generator.eval()
        self.latent_shape = tuple(latent_shape)
        if math.prod(self.latent_shape) != keys.latent_dim:
            raise ValueError(f"the key set is for latents of {keys.latent_dim} entries, the generator takes "
                             f"{math.prod(self.latent_shape)}")
        self.keys = keys
        self.output_range = output_range

    def latents(self, recipient: str, n: int, seed: int) -> torch.Tensor:
        magnitude = torch.randn(n, self.keys.latent_dim, generator=torch.Generator().manual_seed(seed)).abs()
        return (magnitude * self.keys.pattern(recipient)).view(n, *self.latent_shape)

    @torch.no_grad()
    def sample(self, recipient: str, n: int, seed: int) -> np.ndarray:
        device = next(self.generator.parameters()).device
        z = self.latents(recipient, n, seed).to(device)
        return quantize(self.generator(z), *self.output_range)


def invert(module: nn.Module, encoder: LatentEncoder, samples: np.ndarray | torch.Tensor,
           output_range: tuple[float, float], iterations: int = 10, differentiate=None,
           batch_size: int = 256) -> torch.Tensor:
    """Each item's latent: the encoder's guess refined by Levenberg-Marquardt on the pixel MSE to
    the quantisation floor (the detector's search, run to its end, keeping the latent)."""
    targets = to_output_range(samples, *output_range)
    device = next(module.parameters()).device
    floor = quantisation_floor(output_range)
    out = []
    for start in range(0, len(targets), batch_size):
        batch = targets[start : start + batch_size].to(device)
        with torch.no_grad():
            z = encoder(batch)
        levenberg_marquardt(module, batch, z, iterations, floor, differentiate=differentiate)
        out.append(z.cpu())
    return torch.cat(out) if out else torch.empty(0)


def best_matches(search, samples: np.ndarray | torch.Tensor, keysets: Sequence[KeySet],
                 fpr: float = DEFAULT_FPR) -> list[tuple[str, KeyMatch]]:
    """Per item, the key set version and match with the smallest p-value over ``keysets`` (every
    version of a generator's key sets stays decodable), its latent found by ``search`` (a fitted
    :class:`~flipad.detectors.reconstruction.LatentSearch` with its encoder)."""
    if search is None or search.encoder is None:
        raise ValueError("reading keys needs the latent search's encoder: onboard the generator with the "
                         "reconstruction detector (the default) and --search-method encoder-lm")
    z = invert(search.module, search.encoder, samples, search.output_range, differentiate=search.differentiate)
    per_set = [(keys.version, keys.match(z, fpr)) for keys in keysets]
    best = []
    for i in range(len(z)):
        version, match = min(((v, m[i]) for v, m in per_set), key=lambda vm: (vm[1].recipient is None, vm[1].p_value))
        best.append((version, match))
    return best


class DirectionKey:
    """Nie et al.'s latent fingerprint, for comparison: ``bits`` message bits written as ``+-strength``
    along the latent directions that change the generator's output least (the smallest
    eigenvectors of the mean ``J^T J`` over ``probes`` latents), replacing the latent's own
    component there; decoded by projecting the inverted latent on them."""

    def __init__(self, generator: nn.Module, latent_shape: Sequence[int], keys: KeySet, bits: int = 32,
                 strength: float = 1.0, probes: int = 64, seed: int = 0, differentiate=None):
        from .inversion.amortised import jacobian

        self.generator, self.latent_shape, self.keys = generator.eval(), tuple(latent_shape), keys
        self.bits, self.strength = bits, strength
        z = torch.randn(probes, *self.latent_shape, generator=torch.Generator().manual_seed(seed))
        jac = (differentiate or (lambda v: jacobian(generator, v)))(z)
        normal = (jac.transpose(1, 2) @ jac).mean(0).double()
        _, vectors = torch.linalg.eigh(normal)  # ascending: the least visible directions first
        self.directions = vectors[:, :bits].T.float()  # (bits, d), orthonormal
        # each recipient's message: the first ``bits`` entries of its keyed pattern
        self.messages = keys.patterns[:, :bits]

    def latents(self, recipient: str, n: int, seed: int) -> torch.Tensor:
        z = torch.randn(n, self.keys.latent_dim, generator=torch.Generator().manual_seed(seed))
        message = self.messages[self.keys.recipients.index(recipient)]
        z = z - (z @ self.directions.T) @ self.directions + (self.strength * message) @ self.directions
        return z.view(n, *self.latent_shape)

    @torch.no_grad()
    def sample(self, recipient: str, n: int, seed: int, output_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
        return quantize(self.generator(self.latents(recipient, n, seed)), *output_range)

    def match(self, latents: torch.Tensor, fpr: float = DEFAULT_FPR) -> list[KeyMatch]:
        signs = torch.sign(latents.reshape(len(latents), -1).float() @ self.directions.T)
        agree = ((signs @ self.messages.T) + self.bits) / 2
        out = []
        for i, k in enumerate(agree.argmax(1).tolist()):
            count = int(round(float(agree[i, k])))
            p = float(scipy.stats.binom.sf(count - 1, self.bits, 0.5))
            matched = p * len(self.keys.recipients) < fpr
            out.append(KeyMatch(self.keys.recipients[k] if matched else None, count, self.bits, p))
        return out
