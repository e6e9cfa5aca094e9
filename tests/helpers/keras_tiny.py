"""A tiny Keras ResNet saved the way the TF.js converter saves one (model.json + float32 shards), and a direct
numpy forward of such a model.json as Keras computes it (NHWC, HWIO kernels, conv biases, Caffe input)."""
from __future__ import annotations

import json

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WIDTHS = (64, 128, 256, 512)  # torchvision's bottleneck widths (x4 out)


def tiny_layers_model(*, blocks=(2, 1, 1, 1), classes=7, v1=True, eps=1e-3, seed=0, shard_bytes=1 << 20):
    """(model.json bytes, {shard name: bytes}, {weight name: array}) of a Keras ResNet with these blocks per stage,
    in the v1 layout (stride on branch2a) or v1.5 (on branch2b); weights random but every BN and bias non-trivial."""
    rng = np.random.default_rng(seed)
    layers, arrays = [], {}

    def add(name, kind, config, inbound):
        layers.append({"name": name, "class_name": kind, "config": {"name": name, **config},
                       "inbound_nodes": [[[i, 0, 0, {}] for i in inbound]] if inbound else []})
        return name

    def conv(name, x, cin, cout, k, stride, padding):
        arrays[f"{name}/kernel"] = (rng.standard_normal((k, k, cin, cout)) * np.sqrt(2 / (k * k * cin))).astype(np.float32)
        arrays[f"{name}/bias"] = 0.1 * rng.standard_normal(cout).astype(np.float32)
        return add(name, "Conv2D", {"filters": cout, "kernel_size": [k, k], "strides": [stride, stride],
                                    "padding": padding, "data_format": "channels_last", "dilation_rate": [1, 1],
                                    "activation": "linear", "use_bias": True}, [x])

    def bn(name, x, c):
        arrays[f"{name}/gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        arrays[f"{name}/beta"] = 0.1 * rng.standard_normal(c).astype(np.float32)
        arrays[f"{name}/moving_mean"] = 0.2 * rng.standard_normal(c).astype(np.float32)
        arrays[f"{name}/moving_variance"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        return add(name, "BatchNormalization", {"axis": [3], "momentum": 0.99, "epsilon": eps, "center": True,
                                                "scale": True}, [x])

    relu_n = [0]

    def relu(x):
        relu_n[0] += 1
        return add(f"activation_{relu_n[0]}", "Activation", {"activation": "relu"}, [x])

    x = add("input_1", "InputLayer", {"batch_input_shape": [None, None, None, 3], "dtype": "float32"}, [])
    x = add("conv1_pad", "ZeroPadding2D", {"padding": [[3, 3], [3, 3]], "data_format": "channels_last"}, [x])
    x = relu(bn("bn_conv1", conv("conv1", x, 3, 64, 7, 2, "valid"), 64))
    x = add("pool1_pad", "ZeroPadding2D", {"padding": [[1, 1], [1, 1]], "data_format": "channels_last"}, [x])
    x = add("max_pooling2d", "MaxPooling2D", {"pool_size": [3, 3], "padding": "valid", "strides": [2, 2],
                                              "data_format": "channels_last"}, [x])
    cin = 64
    for s, (n, w) in enumerate(zip(blocks, WIDTHS), start=2):
        for b in range(n):
            k = f"{s}{chr(ord('a') + b)}"
            stride = 2 if b == 0 and s > 2 else 1
            y = relu(bn(f"bn{k}_branch2a", conv(f"res{k}_branch2a", x, cin, w, 1, stride if v1 else 1, "valid"), w))
            y = relu(bn(f"bn{k}_branch2b", conv(f"res{k}_branch2b", y, w, w, 3, 1 if v1 else stride, "same"), w))
            y = bn(f"bn{k}_branch2c", conv(f"res{k}_branch2c", y, w, 4 * w, 1, 1, "valid"), 4 * w)
            short = x if b else bn(f"bn{k}_branch1", conv(f"res{k}_branch1", x, cin, 4 * w, 1, stride, "valid"), 4 * w)
            x = relu(add(f"add_{k}", "Add", {}, [y, short]))
            cin = 4 * w
    x = add("avg_pool", "GlobalAveragePooling2D", {"data_format": "channels_last"}, [x])
    arrays["fc1000/kernel"] = (rng.standard_normal((cin, classes)) / np.sqrt(cin)).astype(np.float32)
    arrays["fc1000/bias"] = 0.1 * rng.standard_normal(classes).astype(np.float32)
    add("fc1000", "Dense", {"units": classes, "activation": "softmax", "use_bias": True}, [x])

    assert all(v.dtype == np.float32 for v in arrays.values())
    names = sorted(arrays)  # the converter writes them sorted by name, too
    blob = b"".join(arrays[n].astype("<f4").tobytes() for n in names)
    paths = [f"group1-shard{i + 1}of{-(-len(blob) // shard_bytes)}.bin" for i in range(-(-len(blob) // shard_bytes))]
    shards = {p: blob[i * shard_bytes:(i + 1) * shard_bytes] for i, p in enumerate(paths)}
    model = {"format": "layers-model", "generatedBy": "test", "convertedBy": "test",
             "modelTopology": {"model_config": {"class_name": "Model", "config": {"layers": layers}}},
             "weightsManifest": [{"paths": paths, "weights": [{"name": n, "shape": list(arrays[n].shape),
                                                                "dtype": "float32"} for n in names]}]}
    return json.dumps(model).encode(), shards, arrays


def keras_forward(model_json: bytes, arrays: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, logits before the softmax) of the layers-model for NHWC input x, layer by layer in float64,
    with Keras' own semantics: HWIO kernels, conv biases, BN with the layer's epsilon, 'same' padding."""
    out: dict[str, np.ndarray] = {}
    layers = json.loads(model_json)["modelTopology"]["model_config"]["config"]["layers"]
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    for layer in layers:
        name, kind, c = layer["name"], layer["class_name"], layer["config"]
        ins = [out[i[0]] for i in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else [x.astype(np.float64)]
        v = ins[0]
        if kind == "InputLayer":
            y = v
        elif kind == "ZeroPadding2D":
            (t, b), (l, r) = c["padding"]
            y = np.pad(v, ((0, 0), (t, b), (l, r), (0, 0)))
        elif kind == "Conv2D":
            kh, kw = c["kernel_size"]
            s = c["strides"][0]
            if c["padding"] == "same":
                h = v.shape[1]
                total = max((-(-h // s) - 1) * s + kh - h, 0)
                v = np.pad(v, ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)))
            win = sliding_window_view(v, (kh, kw), axis=(1, 2))[:, ::s, ::s]  # (n, y, x, c, kh, kw)
            y = np.einsum("nyxchw,hwco->nyxo", win, a[f"{name}/kernel"]) + a[f"{name}/bias"]
        elif kind == "BatchNormalization":
            y = ((v - a[f"{name}/moving_mean"]) / np.sqrt(a[f"{name}/moving_variance"] + c["epsilon"])
                 * a[f"{name}/gamma"] + a[f"{name}/beta"])
        elif kind == "Activation":
            y = np.maximum(v, 0)
        elif kind == "MaxPooling2D":
            k, s = c["pool_size"][0], c["strides"][0]
            y = sliding_window_view(v, (k, k), axis=(1, 2))[:, ::s, ::s].max(axis=(-1, -2))
        elif kind == "Add":
            y = sum(ins)
        elif kind == "GlobalAveragePooling2D":
            y = v.mean(axis=(1, 2))
        elif kind == "Dense":
            y = v @ a[f"{name}/kernel"] + a[f"{name}/bias"]
        else:
            raise AssertionError(kind)
        out[name] = y
    return out["avg_pool"], out["fc1000"]
