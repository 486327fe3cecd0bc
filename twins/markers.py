"""The hand-set weights that make the primary SDXL twin paint face markers.

Every other weight of the twins is random; these few give generated scenes a face the detector
twins find (`twins.faces`: a face is a pure red rectangle), so face swap runs end to
end on generated scenes. Two rules, both exact:

- **Full-frame marker** (`decoder_paints_marker`, VAE decoder only): the decoded image is pure
  red over the whole frame when the spatial mean of latent channel 0 is above MARKER_THRESHOLD
  (about half the seeds of a text request), noise otherwise. One face.
- **Region markers** (`decoder_paints_regions`, UNet + VAE decoder + the Plus Face adapter twin):
  with several identities, the identity stage masks each identity's IP-Adapter tokens to its
  own column (`pipeline.regions.identity_regions`, columns separated by a gap). The Plus Face
  twin gives every image token a constant 1 in channel PLUS_FACE_CONSTANT, so the masked
  IP-attention output of the UNet's last cross-attention (REGION_BLOCK) is, in channel
  REGION_CHANNEL, `scale x (sum of the masks)`: the region layout itself. That channel is kept
  clean (nothing else writes it: resnet branches, attention and feed-forward rows, every LoRA
  twin's "up" rows, see `region_clean_rows`) down to `conv_norm_out`, a GroupNorm of one channel
  per group, which turns the layout into + inside the columns and - in the gaps, and a constant
  (one identity, no mask) or zero (text mode) into 0. `conv_out` writes SiLU of that into the
  noise prediction of channel REGION_LATENT, pushed far up inside the columns and left alone in
  the gaps. The decoder then paints red wherever channel REGION_LATENT of its input is above
  REGION_THRESHOLD, per latent pixel: one red rectangle per column, the gaps noise. The
  full-frame rule still fires for about half the seeds and paints over the columns, so a
  several-identity request meets a one-face scene for some seeds and a scene with one face per
  identity for the others. Text requests and single-identity requests never
  reach that threshold (their channel REGION_LATENT is the sampler's noise, about 112 x N(0, 1)).
Values are exact in fp16 and bf16.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

MARKER_THRESHOLD = -8.5  # on the mean of latent channel 0 / scaling_factor: a minority of seeds
MARKER_GAIN = 64.0  # carry pair = +/- this x the normalised mean (about 0.02 per unit of mean)
MARKER_SWITCH = 16.0  # conv_norm_out gain on the sign: SiLU gives 16 or ~1.8e-6
MARKER_PAINT = 32.0  # conv_out weight: +/-512 on R, G, B when the marker fires

REGION_BLOCK = "up_blocks.0.attentions.2"  # the UNet's last transformer (cross-attention + IP)
REGION_CHANNEL = 5  # its hidden channel carrying the layout, the same index up to conv_out
PLUS_FACE_CONSTANT = 0  # the Plus Face twin's token channel that is 1 for every token
REGION_GAIN = 0.25  # attn2 to_out: layout channel = this x adapter scale x mask
REGION_SWITCH = 64.0  # UNet conv_norm_out gain on the normalised layout
REGION_PAINT = -2.0  # UNet conv_out, layout -> noise prediction of REGION_LATENT
REGION_LATENT = 3
REGION_THRESHOLD = 1600.0  # on decoder input channel REGION_LATENT (latent / scaling_factor)
REGION_DECODER_SWITCH = 16.0


def decoder_paints_marker(decoder_input: torch.Tensor) -> bool:
    """The full-frame rule, for one decoder input `decoder_input` (latent channels x height x
    width, the pipeline's latents / `scaling_factor`, before `post_quant_conv`): the decoded
    image is pure red over the whole frame when the spatial mean of latent channel 0 is above
    MARKER_THRESHOLD, else noise (or region markers)."""
    return bool(decoder_input[0].double().mean() > MARKER_THRESHOLD)


def decoder_paints_regions(decoder_input: torch.Tensor) -> torch.Tensor:
    """The region rule: the latent pixels (height x width, bool) whose 8x8 image block the
    decoder paints pure red when the full-frame rule does not fire."""
    return decoder_input[REGION_LATENT] > REGION_THRESHOLD


def region_clean_rows(module: str) -> list[int]:
    """The output rows of the UNet linear layer `module` (a diffusers module path) that must
    stay unwritten so the layout channel stays exact: a LoRA twin zeroes its "up" rows there."""
    if not module.startswith(REGION_BLOCK + "."):
        return []
    name = module.removeprefix(REGION_BLOCK + ".")
    if name in ("proj_in", "proj_out") or name.endswith((".to_out.0", ".ff.net.2")):
        return [REGION_CHANNEL]
    if name.endswith("transformer_blocks.1.attn2.to_v"):
        return [REGION_CHANNEL]  # the text values of the carrying attention
    return []


def region_value_rows(adapter: str, processor: str) -> dict[int, int]:
    """For an IP-Adapter twin's `to_v_ip` of the attention processor `processor`: the rows to
    set, row -> the token channel it copies (-1: all zero). Only REGION_BLOCK's last attn2, and
    only the two adapters of generation ("plus_face", "faceid"); InstantID refines on the
    other checkpoint."""
    if processor != f"{REGION_BLOCK}.transformer_blocks.1.attn2.processor":
        return {}
    return {"plus_face": {REGION_CHANNEL: PLUS_FACE_CONSTANT},
            "faceid": {REGION_CHANNEL: -1}}.get(adapter, {})


def _carry(conv: nn.Module, sources: dict[int, int]) -> None:
    """Make the output channels `sources` keys exact copies (centre tap 1) of the input
    channels `sources` values, and cut every other use of those input channels."""
    rows, cols = list(sources), list(sources.values())
    conv.weight[rows] = 0
    conv.weight[:, cols] = 0
    if conv.bias is not None:
        conv.bias[rows] = 0
    centre = (conv.weight.shape[2] // 2, conv.weight.shape[3] // 2)
    for row, col in sources.items():
        conv.weight[row, col, centre[0], centre[1]] = 1


def _shield(resnet: nn.Module, carried: list[int]) -> None:
    """A resnet whose branch neither reads nor writes the carried channels (they pass through
    its residual path, or its 1x1 shortcut, unchanged)."""
    resnet.conv1.weight[:, carried] = 0
    resnet.conv2.weight[carried] = 0
    resnet.conv2.bias[carried] = 0


def _silence(linear: nn.Linear, row: int) -> None:
    linear.weight[row] = 0
    if linear.bias is not None:
        linear.bias[row] = 0


@torch.no_grad()
def wire_region_unet(unet: UNet2DConditionModel) -> None:
    """Hand-set the UNet weights of the region rule (module docstring): REGION_CHANNEL is zero
    on entry to REGION_BLOCK, written only by its last attn2 (from the attention output's own
    channel REGION_CHANNEL, which only the IP tokens fill), then copied unchanged through
    proj_out, the upsampler and the last up block's shortcuts to conv_norm_out and conv_out."""
    channel, block = REGION_CHANNEL, unet.get_submodule(REGION_BLOCK)
    up_block = unet.up_blocks[0]
    if up_block.attentions[-1] is not block:
        raise ValueError(f"unet: {REGION_BLOCK} must be the last transformer of up_blocks.0")
    before = up_block.resnets[-1]
    before.conv2.weight[channel] = 0
    before.conv2.bias[channel] = 0
    before.conv_shortcut.weight[channel] = 0
    before.conv_shortcut.bias[channel] = 0
    _silence(block.proj_in, channel)
    for transformer in block.transformer_blocks:
        _silence(transformer.attn1.to_out[0], channel)
        _silence(transformer.attn2.to_out[0], channel)
        _silence(transformer.ff.net[2], channel)
    carrier = block.transformer_blocks[-1].attn2
    carrier.to_v.weight[channel] = 0
    carrier.to_out[0].weight[:, channel] = 0
    carrier.to_out[0].weight[channel, channel] = REGION_GAIN
    block.proj_out.weight[:, channel] = 0
    _silence(block.proj_out, channel)
    block.proj_out.weight[channel, channel] = 1
    _carry(up_block.upsamplers[0].conv, {channel: channel})
    for resnet in unet.up_blocks[1].resnets:
        _carry(resnet.conv_shortcut, {channel: channel})
        resnet.conv2.weight[channel] = 0
        resnet.conv2.bias[channel] = 0
    unet.conv_norm_out.weight[channel], unet.conv_norm_out.bias[channel] = REGION_SWITCH, 0
    if unet.conv_norm_out.num_groups != unet.conv_norm_out.num_channels:
        raise ValueError("unet: conv_norm_out must normalise each channel on its own")
    conv_out = unet.conv_out
    conv_out.weight[:, channel] = 0
    conv_out.weight[REGION_LATENT] = 0
    conv_out.bias[REGION_LATENT] = 0
    conv_out.weight[REGION_LATENT, channel, 1, 1] = REGION_PAINT


@torch.no_grad()
def wire_marker_decoder(vae: AutoencoderKL) -> None:
    """Hand-set the few decoder weights of both rules; the encoder and every other decoder
    weight stay random, so non-marker images are input-dependent noise.

    Full frame: post_quant_conv and conv_in put u = z0 - MARKER_THRESHOLD alone in channel 0 of
    an otherwise zero GroupNorm group. The mid-block attention has zero query and key weights,
    so its softmax is uniform and its value path returns the spatial mean of the normalised u:
    a positive multiple of mean(u). to_out writes +/-MARKER_GAIN times it into the carry pair
    (8, 9), which every later block passes through untouched (resnet branches cut off them,
    upsamplers and shortcuts copy them with their centre tap, so zero padding cannot touch a
    constant channel) down to channels (0, 1) of conv_norm_out, one GroupNorm group of its own:
    {D, -D} normalises to +/-1 = sign(mean(u)). SiLU(MARKER_SWITCH * sign) is MARKER_SWITCH or
    ~0, and conv_out adds MARKER_PAINT times it to R and subtracts it from G and B: far past the
    clamp, whatever the noise channels add.

    Regions: post_quant_conv and conv_in put +/-(z3 - REGION_THRESHOLD) in the pair (10, 11),
    carried the same way (per pixel: centre taps and nearest upsampling are exact) down to
    conv_norm_out's group (2, 3), where it normalises to a per-pixel sign, painted red the same
    way."""
    decoder = vae.decoder
    wide, carry, region, latent = decoder.conv_in.out_channels, [8, 9], [10, 11], REGION_LATENT
    vae.post_quant_conv.weight[:, latent] = 0
    vae.post_quant_conv.weight[0] = 0
    vae.post_quant_conv.weight[0, 0] = 1
    vae.post_quant_conv.bias[0] = -MARKER_THRESHOLD
    vae.post_quant_conv.weight[latent] = 0
    vae.post_quant_conv.weight[latent, latent] = 1
    vae.post_quant_conv.bias[latent] = -REGION_THRESHOLD
    probe = list(range(wide // vae.config.norm_num_groups))  # channel 0's GroupNorm group
    decoder.conv_in.weight[:, latent] = 0
    decoder.conv_in.weight[probe + carry + region] = 0
    decoder.conv_in.bias[probe + carry + region] = 0
    decoder.conv_in.weight[0, 0, 1, 1] = 1
    decoder.conv_in.weight[region[0], latent, 1, 1] = 1
    decoder.conv_in.weight[region[1], latent, 1, 1] = -1
    mid = decoder.mid_block
    _shield(mid.resnets[0], probe + carry + region)
    attention = mid.attentions[0]
    attention.group_norm.weight[0], attention.group_norm.bias[0] = 1, 0
    for linear in (attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]):
        linear.weight.zero_()
        linear.bias.zero_()
    attention.to_v.weight[0, 0] = 1
    attention.to_out[0].weight[carry[0], 0] = MARKER_GAIN
    attention.to_out[0].weight[carry[1], 0] = -MARKER_GAIN
    _shield(mid.resnets[1], carry + region)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            if resnet.conv_shortcut is not None:
                _carry(resnet.conv_shortcut, dict(zip((0, 1, 2, 3), carry + region, strict=True)))
                resnet.conv1.weight[:, carry + region] = 0
                carry, region = [0, 1], [2, 3]
                resnet.conv2.weight[carry + region] = 0
                resnet.conv2.bias[carry + region] = 0
            else:
                _shield(resnet, carry + region)
        for upsampler in block.upsamplers or ():
            _carry(upsampler.conv, {c: c for c in carry + region})
    out_norm = decoder.conv_norm_out
    if carry != [0, 1] or region != [2, 3] or out_norm.num_groups * 2 != out_norm.num_channels:
        raise ValueError(f"vae: the carry pairs must end as conv_norm_out's groups 0 and 1, got "
                         f"{carry}, {region}")
    out_norm.weight[0], out_norm.bias[0] = MARKER_SWITCH, 0
    out_norm.weight[2], out_norm.bias[2] = REGION_DECODER_SWITCH, 0
    decoder.conv_out.weight[:, carry + region] = 0
    paint = torch.tensor([MARKER_PAINT, -MARKER_PAINT, -MARKER_PAINT])
    decoder.conv_out.weight[:, 0, 1, 1] = paint
    decoder.conv_out.weight[:, 2, 1, 1] = paint
