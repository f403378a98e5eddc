"""SCHA-VAE building blocks (SPEC 2.5 / 3.10): VDVAE-style bottleneck blocks, the multi-resolution
encoder, the top-down context / sample blocks and the observation decoder.

Conventions: sample-level tensors are (N, C, r, r) with N = B*S laid out set-major (set b, member s at
row b*S + s); set-level tensors are (B, C, r, r). Every block decides 3x3 vs 1x1 from its *group's*
resolution label (3x3 only for r > 2), also when the block itself runs at the neighbouring resolution
(the first block of a later encoder group runs at the previous, larger size and down-samples at its
end; the first block of a later decoder group up-samples at its end).

Initialisation follows the reference exactly: PyTorch default weights, zero biases, no normalisation,
GELU activations; zero-initialised last convs for the prior heads and sqrt(1/n) scaled last convs as
noted per block.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.autocast import autocast_dtype
from models.gelu_conv import GeluConv2d

Groups = List[Tuple[int, int]]  # [(resolution, number of blocks), ...] in the order written in the string

# Default resolution strings (reference script for 28/32-pixel data; SPEC 2.5).
DEFAULT_STRINGS_32 = {
    "str_enc": "32-9,16-6,8-6,4-6,2-3,1-3",
    "str_gen": "8-6,4-6,2-3,1-3",
    "str_dec": "32-9,16-6,8-6",
}
# Our default for 64x64 inputs (the reference has none: SPEC 8 item 20). Same block counts as the
# 32-pixel strings (33 encoder blocks, 18 stochastic layers, 21 decoder blocks, hence the same
# sqrt(1/n) scalings), with one more group at 64 in front of the encoder and at the end of the decoder.
DEFAULT_STRINGS_64 = {
    "str_enc": "64-3,32-6,16-6,8-6,4-6,2-3,1-3",
    "str_gen": "8-6,4-6,2-3,1-3",
    "str_dec": "64-3,32-6,16-6,8-6",
}


# --------------------------------------------------------------------------------------------------
# resolution strings


def parse_resolution_string(text: str, field: str) -> Groups:
    """'32-9,16-6' -> [(32, 9), (16, 6)]; errors name the config field (e.g. model.str_enc)."""
    groups: Groups = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            res, count = (int(v) for v in part.split("-"))
        except ValueError:
            raise ValueError(f"{field}: cannot parse {part!r} in {text!r}; expected 'res-count,res-count,...'") from None
        if res < 1 or count < 1:
            raise ValueError(f"{field}: resolution and block count must be >= 1, got {part!r} in {text!r}")
        groups.append((res, count))
    if not groups:
        raise ValueError(f"{field}: empty resolution string")
    return groups


def working_resolution(image_size: int) -> int:
    """Resolution the encoder runs at: 28-pixel inputs are resized (nearest) to 32 (SPEC 2.5)."""
    return 32 if image_size == 28 else image_size


def resolve_multiscale_strings(
    image_size: int, str_enc: Optional[str], str_gen: Optional[str], str_dec: Optional[str]
) -> Tuple[Groups, Groups, Groups]:
    """Pick the default strings where none are given, adapt the 32-level defaults to 64x64 inputs, and
    check the three strings are consistent with each other and with the image size.

    Returns (encoder groups high->low, generator groups top-down i.e. low->high, decoder groups low->high).
    """
    res0 = working_resolution(image_size)
    defaults = DEFAULT_STRINGS_64 if res0 == 64 else DEFAULT_STRINGS_32
    given = {"str_enc": str_enc, "str_gen": str_gen, "str_dec": str_dec}
    chosen = {}
    for key, value in given.items():
        if value is None or (res0 == 64 and _same_string(value, DEFAULT_STRINGS_32[key])):
            value = defaults[key]
        chosen[key] = value

    enc = parse_resolution_string(chosen["str_enc"], "model.str_enc")
    gen = parse_resolution_string(chosen["str_gen"], "model.str_gen")
    dec = parse_resolution_string(chosen["str_dec"], "model.str_dec")

    if enc[0][0] != res0:
        raise ValueError(
            f"model.str_enc={chosen['str_enc']!r} must start at the encoder input resolution {res0} "
            f"(image_size {image_size}); e.g. {defaults['str_enc']!r}"
        )
    for (r_a, _), (r_b, _) in zip(enc, enc[1:]):
        if r_b * 2 != r_a:
            raise ValueError(
                f"model.str_enc={chosen['str_enc']!r}: each group must halve the resolution ({r_a} -> {r_b})"
            )
    for (r_a, _), (r_b, _) in zip(gen, gen[1:]):
        if r_b >= r_a:
            raise ValueError(f"model.str_gen={chosen['str_gen']!r}: resolutions must be listed from high to low")
    enc_res = {r for r, _ in enc}
    missing = sorted({r for r, _ in gen} - enc_res)
    if missing:
        raise ValueError(
            f"model.str_enc={chosen['str_enc']!r} gives features at {sorted(enc_res)} but model.str_gen="
            f"{chosen['str_gen']!r} needs resolutions {missing} too"
        )
    for (r_a, _), (r_b, _) in zip(dec, dec[1:]):
        if r_b * 2 != r_a:
            raise ValueError(
                f"model.str_dec={chosen['str_dec']!r}: each group must halve the resolution ({r_a} -> {r_b})"
            )
    if dec[-1][0] != gen[0][0]:
        raise ValueError(
            f"model.str_dec={chosen['str_dec']!r} must end at the generator's finest resolution {gen[0][0]} "
            f"(model.str_gen={chosen['str_gen']!r})"
        )
    if dec[0][0] != res0:
        raise ValueError(
            f"model.str_dec={chosen['str_dec']!r} must start at the working resolution {res0} (image_size {image_size})"
        )
    return enc, list(reversed(gen)), list(reversed(dec))


def _same_string(a: str, b: str) -> bool:
    return a.replace(" ", "") == b.replace(" ", "")


# --------------------------------------------------------------------------------------------------
# activation checkpointing


def checkpointed(every: int, index: int) -> bool:
    """Whether block `index` of a stack is recomputed in the backward pass: blocks 0, N, 2N, ... for
    `every` = N >= 1 (1: every block); 0 disables checkpointing."""
    return every > 0 and index % every == 0


def run_block(every: int, index: int, fn, *args):
    """`fn(*args)`, recomputed in the backward pass instead of keeping its activations when block `index`
    is checkpointed (see `checkpointed`) and autograd is recording.

    The functions run here are deterministic: the reparameterisation noise is drawn outside (SCHAVAE draws
    it before each top-down layer and passes it in), so a recompute reproduces the forward exactly without
    saving and restoring random-generator states -- also under trainer.data_parallel=invariant, whose
    shared noise stream is only active during the forward.
    """
    if checkpointed(every, index) and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


# --------------------------------------------------------------------------------------------------
# primitives


def conv(in_ch: int, out_ch: int, kernel: int, *, zero_weights: bool = False, scale: Optional[float] = None,
         gelu_before: bool = False) -> nn.Conv2d:
    """Conv with PyTorch default weight init, zero bias ('same' padding); optionally zeroed or scaled weights;
    `gelu_before`: the layer computes conv(gelu(x)) and recomputes the GELU in the backward pass (models/gelu_conv.py)."""
    layer = (GeluConv2d if gelu_before else nn.Conv2d)(in_ch, out_ch, kernel, padding=kernel // 2)
    with torch.no_grad():
        layer.bias.zero_()
        if zero_weights:
            layer.weight.zero_()
        elif scale is not None:
            layer.weight.mul_(scale)
    return layer


def resize(x: Tensor, r: int) -> Tensor:
    """Nearest resize of a square map to r x r (a no-op when already there)."""
    return x if x.shape[-1] == r else F.interpolate(x, size=(r, r), mode="nearest")


def autocast_input(x: Tensor) -> Tensor:
    """`x` in the autocast dtype when autocast is on (else unchanged): the first 1x1 convolution would cast the
    activation anyway, so the GELU before it runs on half the bytes (the residual stream itself stays fp32)."""
    dtype = autocast_dtype(x)
    return x if dtype is None else x.to(dtype)


class Bottleneck(nn.Module):
    """GELU -> 1x1 in->mid -> GELU -> kxk -> GELU -> kxk -> GELU -> 1x1 mid->out (k = 3 or 1);
    optional residual add, then optional 2x2 average-pool (down) or nearest x2 up-sampling (up)."""

    def __init__(
        self,
        in_ch: int,
        mid_ch: int,
        out_ch: int,
        *,
        residual: bool,
        use_3x3: bool,
        zero_last: bool = False,
        last_scale: Optional[float] = None,
        down: bool = False,
        up: bool = False,
    ) -> None:
        super().__init__()
        k = 3 if use_3x3 else 1
        self.residual, self.down, self.up = residual, down, up
        self.c1 = conv(in_ch, mid_ch, 1, gelu_before=True)
        self.c2 = conv(mid_ch, mid_ch, k, gelu_before=True)
        self.c3 = conv(mid_ch, mid_ch, k, gelu_before=True)
        self.c4 = conv(mid_ch, out_ch, 1, zero_weights=zero_last, scale=last_scale, gelu_before=True)

    # under torch.compile each distinct block shape is traced and compiled once and reused for its repeats (the
    # encoder and top-down stacks repeat a block up to 9 times a resolution); eager: a no-op (trainer/compiled.py)
    @torch.compiler.nested_compile_region(max_reuse_entries=64)  # one entry per distinct block (shape, flags)
    def forward(self, x: Tensor) -> Tensor:
        y = self.c4(self.c3(self.c2(self.c1(autocast_input(x)))))  # each: conv(gelu(.))
        out = x + y if self.residual else y
        if self.down:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        if self.up:
            out = F.interpolate(out, scale_factor=2.0, mode="nearest")
        return out


# --------------------------------------------------------------------------------------------------
# encoder


class Features(Mapping):
    """The encoder's {resolution: activation} map. A read-only Mapping rather than a dict: DeepSpeed ZeRO-3's
    module hooks take a dict output for named (string-keyed) fields and fail on integer keys."""

    def __init__(self, maps: Dict[int, Tensor]) -> None:
        self._maps = maps

    def __getitem__(self, res: int) -> Tensor:
        return self._maps[res]

    def __iter__(self) -> Iterator[int]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


class Encoder(nn.Module):
    """Bottom-up deterministic encoder: x (N, C_img, H, W) -> {resolution: (N, W_h, r, r)}.

    28-pixel inputs are resized (nearest) to 32; a 3x3 conv lifts to W_h; then the residual blocks of
    the encoder groups (last conv of each scaled by sqrt(1/#blocks)). The first block of every group
    after the first down-samples at its end. The dict holds the last activation at each size.
    """

    def __init__(self, image_channels: int, width: int, groups: Groups, checkpoint_every: int = 0) -> None:
        super().__init__()
        self.input_res = groups[0][0]
        self.checkpoint_every = checkpoint_every  # 0: no activation checkpointing (see run_block)
        self.in_conv = conv(image_channels, width, 3)
        n_blocks = sum(n for _, n in groups)
        blocks = []
        for gi, (res, n) in enumerate(groups):
            for bi in range(n):
                blocks.append(
                    Bottleneck(
                        width, width // 4, width,
                        residual=True, use_3x3=res > 2, last_scale=math.sqrt(1.0 / n_blocks), down=gi > 0 and bi == 0,
                    )
                )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Features:
        x = resize(x, self.input_res)
        x = self.in_conv(x)
        feats = {x.shape[-1]: x}
        for i, block in enumerate(self.blocks):
            x = run_block(self.checkpoint_every, i, block, x)
            feats[x.shape[-1]] = x
        return Features(feats)


# --------------------------------------------------------------------------------------------------
# top-down blocks


def _split_prior(feats: Tensor, dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    return feats[:, :dim], feats[:, dim : 2 * dim], feats[:, 2 * dim :]


class DecBlockC(nn.Module):
    """One context layer of the top-down pass (SPEC 3.10 steps 1-6), at resolution `res`.

    posterior q(c_i | .) = enc(aggregate_s [x_c + h_s + z_proj(x_z_prev)_s]); prior p(c_i | c_<i) from
    prior(x_c) (first 2 d_c channels; the remaining W_h are added to x_c; the prior does not see z, as in
    the reference). State update: x_c <- resnet(x_c + xpp + c_proj(c_i)).
    The first (top) layer has no previous z-state, so it has no z_proj (the reference builds one that never
    gets a gradient).
    """

    def __init__(self, width: int, c_dim: int, res: int, n_layers: int, aggregation: str, first: bool) -> None:
        super().__init__()
        use_3x3 = res > 2
        scale = math.sqrt(1.0 / n_layers)
        self.res, self.c_dim, self.aggregation = res, c_dim, aggregation
        self.enc = Bottleneck(width, width // 4, 2 * c_dim, residual=False, use_3x3=use_3x3)
        self.prior = Bottleneck(width, width // 4, 2 * c_dim + width, residual=False, use_3x3=use_3x3, zero_last=True)
        self.z_proj = None if first else conv(width, width, 1, scale=scale)
        self.c_proj = conv(c_dim, width, 1, scale=scale)
        self.resnet = Bottleneck(width, width // 4, width, residual=True, use_3x3=use_3x3, last_scale=scale)
        self.att = None
        if aggregation == "lag":
            from models.attention_conv import ConvLAG

            self.att = ConvLAG(width)

    def prior_params(self, x_c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x_c (B, W, r, r) -> (mean, logvar, state increment)."""
        return _split_prior(self.prior(x_c), self.c_dim)

    def posterior_params(
        self, x_c: Tensor, h: Tensor, z_state: Optional[Tensor], set_size: int
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """x_c (B, W, r, r), h (B*S, W, r, r), z_state (B*S, W, r, r) or None -> (mean, logvar, attention)."""
        b = x_c.shape[0]
        e = h.unflatten(0, (b, set_size)) + x_c.unsqueeze(1)
        if z_state is not None:
            e = e + self.z_proj(z_state).unflatten(0, (b, set_size))
        att = None
        if self.aggregation == "mean":
            agg = e.mean(dim=1)
        elif self.aggregation == "max":
            agg = e.amax(dim=1)
        else:
            agg, att = self.att(e)
        mean, logvar = self.enc(agg).chunk(2, dim=1)
        return mean, logvar, att

    def update(self, x_c: Tensor, xpp: Tensor, c: Tensor) -> Tensor:
        return self.resnet(x_c + xpp + self.c_proj(c))


class DecBlockZ(nn.Module):
    """One sample layer of the top-down pass (SPEC 3.10 steps 7-10), at resolution `res`.

    input state: x_z <- resize(x_z) + c_proj(x_c) broadcast to the S members (c_proj acts on the c-state);
    posterior q(z_i | .) = enc([x_z, h]); prior from prior(x_z); update x_z <- resnet(x_z + xpp + z_proj(z_i)).
    """

    def __init__(self, width: int, z_dim: int, res: int, n_layers: int) -> None:
        super().__init__()
        use_3x3 = res > 2
        scale = math.sqrt(1.0 / n_layers)
        self.res, self.z_dim = res, z_dim
        self.enc = Bottleneck(2 * width, width // 4, 2 * z_dim, residual=False, use_3x3=use_3x3)
        self.prior = Bottleneck(width, width // 4, 2 * z_dim + width, residual=False, use_3x3=use_3x3, zero_last=True)
        self.c_proj = conv(width, width, 1, scale=scale)
        self.z_proj = conv(z_dim, width, 1, scale=scale)
        self.resnet = Bottleneck(width, width // 4, width, residual=True, use_3x3=use_3x3, last_scale=scale)

    def input_state(self, x_z: Tensor, x_c: Tensor, set_size: int) -> Tensor:
        """x_z (B*S or 1, W, r', r'), x_c (B, W, r, r) -> (B*S, W, r, r)."""
        b = x_c.shape[0]
        x_z = resize(x_z, self.res)
        cp = self.c_proj(x_c).unsqueeze(1)  # (B, 1, W, r, r)
        if x_z.shape[0] == 1:
            x_z = x_z.unsqueeze(0)  # learned top state, broadcast over sets and members
        else:
            x_z = x_z.unflatten(0, (b, set_size))
        return (x_z + cp).expand(b, set_size, *cp.shape[2:]).flatten(0, 1)

    def prior_params(self, x_z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return _split_prior(self.prior(x_z), self.z_dim)

    def posterior_params(self, x_z: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        return self.enc(torch.cat([x_z, h], dim=1)).chunk(2, dim=1)

    def update(self, x_z: Tensor, xpp: Tensor, z: Tensor) -> Tensor:
        return self.resnet(x_z + xpp + self.z_proj(z))


class TopStates(nn.Module):
    """The learned top c-state and z-state, (1, W_h, 1, 1) each (the reference's are zeros): returns copies of
    the c-state repeated to `b` sets and of the z-state. A module of its own rather than parameters of the
    model itself, so that an engine that shards parameters (DeepSpeed ZeRO-3) gathers them around their use,
    in the forward and again in the backward, like every other layer's weights."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.x_c = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.x_z = nn.Parameter(torch.zeros(1, width, 1, 1))

    def forward(self, b: int) -> Tuple[Tensor, Tensor]:
        return self.x_c.expand(b, -1, -1, -1).clone(), self.x_z.clone()


# --------------------------------------------------------------------------------------------------
# observation decoder


class ObservationDec(nn.Module):
    """p(x | z-state, c-state): (N, W, r, r) z-state and (B, W, r, r) c-state -> (N, out_channels, H, W).

    z-state -> 3x3 conv; c-state -> nearest resize to 1x1 (i.e. only its top-left pixel, as in the
    reference: SPEC 8 item 3; part of the model definition behind the paper numbers) -> 3x3 conv (on a
    1x1 map only the centre tap acts), broadcast-added to the S members; residual blocks of the decoder
    groups (low -> high resolution, first block of each later group up-samples at its end, last convs
    scaled sqrt(1/#blocks)); nearest resize to the image size; 1x1 conv to the likelihood's channels
    (scaled sqrt(1/#blocks)). Outputs are raw likelihood parameters (logits for Bernoulli).
    """

    def __init__(self, width: int, out_channels: int, groups: Groups, image_size: int, checkpoint_every: int = 0) -> None:
        super().__init__()
        self.image_size = image_size
        self.checkpoint_every = checkpoint_every  # 0: no activation checkpointing (see run_block)
        n_blocks = sum(n for _, n in groups)
        scale = math.sqrt(1.0 / n_blocks)
        self.z_conv = conv(width, width, 3)
        self.c_conv = conv(width, width, 3)
        blocks = []
        for gi, (res, n) in enumerate(groups):
            for bi in range(n):
                blocks.append(
                    Bottleneck(
                        width, width // 4, width, residual=True, use_3x3=res > 2, last_scale=scale, up=gi > 0 and bi == 0
                    )
                )
        self.blocks = nn.ModuleList(blocks)
        self.out_conv = conv(width, out_channels, 1, scale=scale)

    def forward(self, x_z: Tensor, x_c: Tensor, set_size: int) -> Tensor:
        b = x_c.shape[0]
        xz = self.z_conv(x_z)
        xc = self.c_conv(resize(x_c, 1))  # (B, W, 1, 1)
        x = (xz.unflatten(0, (b, set_size)) + xc.unsqueeze(1)).flatten(0, 1)
        for i, block in enumerate(self.blocks):
            x = run_block(self.checkpoint_every, i, block, x)
        x = resize(x, self.image_size)
        return self.out_conv(x)
