"""keras_convert module: a Keras ResNet-50 saved as a TF.js layers-model (model.json + float32 shards) to a torchvision
state dict, with numpy only (nothing from the package is executed or unpickled)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import torch

from resnet_batch.layouts import MSRA_V1, Layout
from resnet_batch.errors import WeightsError

# The Keras port's preprocessing (Caffe's): BGR channels, 0-255, this per-channel mean subtracted, no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_BLOCK = re.compile(r"res([2-5])([a-z])_branch2a")


@dataclass(frozen=True)
class Converted:
    """A converted network: torchvision state dict, the layout it needs, its depth and classes."""

    state_dict: dict[str, torch.Tensor]
    layout: Layout
    blocks: tuple[int, ...]  # bottlenecks per stage: (3, 4, 6, 3) for ResNet-50
    num_classes: int


def convert_layers_model(model_json: bytes, shards: dict[str, bytes], *, mean: tuple[float, ...],
                         std: tuple[float, ...], what: str = "model.json") -> Converted:
    """The torchvision state dict of a Keras ResNet (v1 names: conv1, bn_conv1, res2a_branch2a, ..., fc1000).

    `shards` maps the manifest's file names to their bytes. Kernels go HWIO -> OIHW, the Dense kernel is
    transposed, each conv bias is folded into the following batch norm's running mean (torchvision's convs have
    no bias), and the Caffe preprocessing is folded into conv1, so that the model takes torchvision's input:
    RGB scaled to 0-1, minus `mean`, over `std`. Exact but for conv1's zero padding, which now pads with the
    normalised zero instead of Caffe's (a pixel of value 255*mean instead of CAFFE_MEAN_BGR: at most 0.5/255 apart).
    """
    try:
        model = json.loads(model_json)
        layers = {layer["name"]: layer for layer in model["modelTopology"]["model_config"]["config"]["layers"]}
        manifest = model["weightsManifest"]
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{what} is not a TF.js layers-model ({type(err).__name__}: {err})") from None
    if model.get("format") != "layers-model":
        raise WeightsError(f"{what}: format {model.get('format')!r}, not a TF.js layers-model")
    blocks = _blocks(layers, what)
    layout = _check_topology(layers, blocks, what)
    arrays = _read_weights(manifest, shards, what)
    sd = _torchvision_state_dict(arrays, blocks, what)
    _fold_caffe_preprocessing(sd, mean=mean, std=std)
    return Converted({k: torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}, layout, blocks,
                     int(sd["fc.bias"].shape[0]))


def _blocks(layers: dict, what: str) -> tuple[int, ...]:
    """Bottlenecks per stage, from the names res{stage}{a,b,...}_branch2a; letters must run a, b, c, ... ."""
    found: dict[int, list[str]] = {}
    for name in layers:
        if m := _BLOCK.fullmatch(name):
            found.setdefault(int(m.group(1)), []).append(m.group(2))
    if sorted(found) != [2, 3, 4, 5]:
        raise WeightsError(f"{what}: not a Keras ResNet (stages {sorted(found)} instead of 2-5)")
    out = []
    for stage in (2, 3, 4, 5):
        letters = sorted(found[stage])
        if letters != [chr(ord("a") + i) for i in range(len(letters))]:
            raise WeightsError(f"{what}: stage {stage} blocks {letters} do not run a, b, c, ...")
        out.append(len(letters))
    return tuple(out)


def _config(layers: dict, name: str, kind: str, what: str) -> dict:
    layer = layers.get(name)
    if layer is None or layer.get("class_name") != kind:
        raise WeightsError(f"{what}: expected a {kind} layer named {name!r}")
    return layer["config"]


def _check_topology(layers: dict, blocks: tuple[int, ...], what: str) -> Layout:
    """The layout the graph was built in (ResNet v1: a downsampling block strides in its first 1x1 conv, which
    torchvision reproduces exactly), after checking every layer the conversion relies on: kernel sizes, strides,
    paddings, biases, batch-norm settings, pooling. Refuses anything else by name (a v1.5 Keras graph, with
    'same' padding on a strided 3x3 conv, pads asymmetrically where torchvision does not)."""
    convs: list[tuple[str, int, int, str]] = [("conv1", 7, 2, "valid")]
    for s, n in zip((2, 3, 4, 5), blocks):
        for b in range(n):
            base = f"res{s}{chr(ord('a') + b)}_branch"
            stride = 2 if b == 0 and s > 2 else 1
            convs += [(base + "2a", 1, stride, "valid"), (base + "2b", 3, 1, "same"), (base + "2c", 1, 1, "valid")]
            if b == 0:
                convs.append((base + "1", 1, stride, "valid"))
    for name, k, stride, padding in convs:
        c = _config(layers, name, "Conv2D", what)
        got = (tuple(c["kernel_size"]), tuple(c["strides"]), c["padding"], tuple(c.get("dilation_rate", (1, 1))),
               c.get("activation"), c.get("use_bias"), c.get("data_format"))
        want = ((k, k), (stride, stride), padding, (1, 1), "linear", True, "channels_last")
        if got != want:
            raise WeightsError(f"{what}: layer {name} is {got}, expected {want} (kernel, strides, padding, dilation, "
                               "activation, bias, data format) for ResNet v1")
        bn = _config(layers, "bn_conv1" if name == "conv1" else "bn" + name[3:], "BatchNormalization", what)
        if not (bn.get("center", True) and bn.get("scale", True)) or list(bn.get("axis", [3])) not in ([3], [-1]):
            raise WeightsError(f"{what}: batch norm after {name} is not a per-channel scale-and-shift")
        if float(bn["epsilon"]) != MSRA_V1.bn_eps:
            raise WeightsError(f"{what}: batch norm after {name} has epsilon {bn['epsilon']}, not ResNet v1's "
                               f"{MSRA_V1.bn_eps}")
    pads = {n: _config(layers, n, "ZeroPadding2D", what)["padding"] for n in ("conv1_pad", "pool1_pad")}
    if pads != {"conv1_pad": [[3, 3], [3, 3]], "pool1_pad": [[1, 1], [1, 1]]}:
        raise WeightsError(f"{what}: zero paddings {pads}, expected 3 before conv1 and 1 before the max pool")
    pools = [layer["config"] for layer in layers.values() if layer.get("class_name") == "MaxPooling2D"]
    if len(pools) != 1 or (tuple(pools[0]["pool_size"]), tuple(pools[0]["strides"]), pools[0]["padding"]) != (
            (3, 3), (2, 2), "valid"):
        raise WeightsError(f"{what}: expected one 3x3 stride-2 max pool after conv1")
    if not any(layer.get("class_name") == "GlobalAveragePooling2D" for layer in layers.values()):
        raise WeightsError(f"{what}: no global average pooling before fc1000")
    _config(layers, "fc1000", "Dense", what)
    return MSRA_V1


def _read_weights(manifest: list, shards: dict[str, bytes], what: str) -> dict[str, np.ndarray]:
    """Every weight of the manifest: each group's files concatenated in order, the weights laid end to end in
    it, little-endian float32. The files must hold exactly those bytes."""
    arrays: dict[str, np.ndarray] = {}
    for group in manifest:
        paths = group["paths"]
        missing = [p for p in paths if p not in shards]
        if missing:
            raise WeightsError(f"{what}: weight files {missing[:3]} are missing")
        buf = b"".join(shards[p] for p in paths)
        at = 0
        for w in group["weights"]:
            if w.get("dtype") != "float32" or "quantization" in w:
                raise WeightsError(f"{what}: weight {w.get('name')!r} is {w.get('dtype')}"
                                   f"{' quantized' if 'quantization' in w else ''}, not float32")
            shape = tuple(int(d) for d in w["shape"])
            n = int(np.prod(shape, dtype=np.int64)) * 4
            if at + n > len(buf):
                raise WeightsError(f"{what}: the weight files end inside {w['name']!r} ({len(buf):,} bytes)")
            if w["name"] in arrays:
                raise WeightsError(f"{what}: weight {w['name']!r} appears twice in the manifest")
            arrays[w["name"]] = np.frombuffer(buf, dtype="<f4", count=n // 4, offset=at).reshape(shape)
            at += n
        if at != len(buf):
            raise WeightsError(f"{what}: {len(buf) - at:,} bytes in {paths[0]}... belong to no weight")
    return arrays


def _torchvision_state_dict(arrays: dict[str, np.ndarray], blocks: tuple[int, ...], what: str) -> dict:
    """Keras names to torchvision's: conv kernels HWIO -> OIHW, biases folded into the next batch norm."""
    sd: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in arrays:
            raise WeightsError(f"{what}: weight {name!r} is missing")
        used.add(name)
        return arrays[name].astype(np.float32)

    def conv_bn(conv: str, bn: str, prefix_conv: str, prefix_bn: str) -> None:
        kernel = take(f"{conv}/kernel")  # (kh, kw, in, out)
        bias = take(f"{conv}/bias")
        sd[f"{prefix_conv}.weight"] = kernel.transpose(3, 2, 0, 1)  # (out, in, kh, kw)
        # BN(conv(x) + bias) with running mean m is BN'(conv(x)) with running mean m - bias
        sd[f"{prefix_bn}.weight"], sd[f"{prefix_bn}.bias"] = take(f"{bn}/gamma"), take(f"{bn}/beta")
        sd[f"{prefix_bn}.running_mean"] = take(f"{bn}/moving_mean") - bias
        sd[f"{prefix_bn}.running_var"] = take(f"{bn}/moving_variance")
        sd[f"{prefix_bn}.num_batches_tracked"] = np.array(0, dtype=np.int64)

    conv_bn("conv1", "bn_conv1", "conv1", "bn1")
    for layer, (stage, n) in enumerate(zip((2, 3, 4, 5), blocks), start=1):
        for b in range(n):
            k = f"{stage}{chr(ord('a') + b)}"
            t = f"layer{layer}.{b}"
            for i, branch in enumerate("abc", start=1):
                conv_bn(f"res{k}_branch2{branch}", f"bn{k}_branch2{branch}", f"{t}.conv{i}", f"{t}.bn{i}")
            if b == 0:
                conv_bn(f"res{k}_branch1", f"bn{k}_branch1", f"{t}.downsample.0", f"{t}.downsample.1")
    sd["fc.weight"] = take("fc1000/kernel").T  # Dense (in, out) -> Linear (out, in)
    sd["fc.bias"] = take("fc1000/bias")
    unused = sorted(set(arrays) - used)
    if unused:
        raise WeightsError(f"{what}: {len(unused)} weights have no place in a ResNet (e.g. {unused[:3]})")
    return sd


def _fold_caffe_preprocessing(sd: dict, *, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Make conv1 + bn1 take torchvision's input x = (p/255 - mean)/std (RGB) instead of Caffe's p[BGR] - CAFFE_MEAN.

    Caffe channel j reads RGB channel 2-j: p = 255*(std*x + mean), so the Caffe input is 255*std*x + (255*mean -
    caffe_mean). conv1 scales by 255*std with its input channels reversed; the constant part, through the kernel,
    is a per-output offset that leaves bn1's running mean.
    """
    w = sd["conv1.weight"].astype(np.float64)  # (64, 3 BGR, 7, 7)
    mean_bgr = np.asarray(mean, np.float64)[::-1]
    std_bgr = np.asarray(std, np.float64)[::-1]
    offset = np.einsum("ojhw,j->o", w, 255.0 * mean_bgr - np.asarray(CAFFE_MEAN_BGR, np.float64))
    sd["conv1.weight"] = (w * (255.0 * std_bgr)[None, :, None, None])[:, ::-1].astype(np.float32)
    sd["bn1.running_mean"] = (sd["bn1.running_mean"].astype(np.float64) - offset).astype(np.float32)
