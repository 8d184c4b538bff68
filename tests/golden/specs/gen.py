#!/usr/bin/env python3
"""Golden PyTorch checkpoints for `modelfusion spec / permute / align` (issue 11).

Builds small, randomly initialised PyTorch models of every architecture family the CLI's
spec inference is meant to detect, and writes for each model NAME:

    OUT/NAME/model.safetensors     state_dict of model A (seed s)
    OUT/NAME/io.safetensors        `input` (fixed batch) and `logits` = A(input), eval mode
    OUT/NAME_b/model.safetensors   state_dict of an independently initialised model B
    OUT/NAME_b/io.safetensors      the same `input` and B(input)

and (re)writes the committed expectation tables tests/golden/specs/tables/*.json: the ordered
list of [tensor name, safetensors dtype, shape] of each state dict, plus "family". Tables are
also written for real-size torchvision ResNet-34/101/152 and VGG-13/16/19/16-BN (built on the
`meta` device: shapes only, no weights) and for Git Re-Basin's flax ResNet-20 (see LAYOUTS.md).

Every BatchNorm gets running statistics calibrated on a random batch and then perturbed, and a
random weight/bias, so it is not an identity; every `num_batches_tracked` (int64) gets a
distinct nonzero value (A: 101, 104, ...; B: 5003, 5010, ...). All biases get small random
offsets (torchvision initialises VGG biases to 0, which a permutation cannot change).

Model weights are NOT committed; regenerate them with:

    python3 -m venv ../venv-torch
    venv/bin/pip install torch torchvision safetensors numpy
    venv/bin/python tests/golden/specs/gen.py [OUT]      # OUT default /tmp/mf-golden-specs
    venv/bin/python tests/golden/specs/gen.py --tables-only   # only tables/*.json

check_torch.py imports this file for the model builders (build(name, seed)).
"""
import argparse
import json
import os
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vgg import VGG, make_layers

HERE = os.path.dirname(os.path.abspath(__file__))
TABLES = os.path.join(HERE, "tables")
DEFAULT_OUT = "/tmp/mf-golden-specs"

SEED_A = 1000
SEED_B = 2000

ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

# ----------------------------------------------------------------------------- models

# VGG-11 configuration ("A" in torchvision) with every channel count divided by 8.
VGG11_SMALL_CFG = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]


def small_vgg(batch_norm):
    model = VGG(make_layers(VGG11_SMALL_CFG, batch_norm=batch_norm), num_classes=10)
    c = VGG11_SMALL_CFG[-2]
    # Same structure as torchvision's classifier (names classifier.0/3/6), smaller hidden width.
    model.classifier = nn.Sequential(
        nn.Linear(c * 7 * 7, 128), nn.ReLU(True), nn.Dropout(),
        nn.Linear(128, 128), nn.ReLU(True), nn.Dropout(),
        nn.Linear(128, 10),
    )
    return model


class CifarBasicBlock(nn.Module):
    """REPAIR / kuangliu-style basic block; the projection shortcut is `shortcut.0` (conv)
    and `shortcut.1` (BatchNorm2d). REPAIR uses a 3x3 shortcut conv, kuangliu's
    pytorch-cifar a 1x1 one (`shortcut_kernel`)."""

    def __init__(self, in_planes, planes, stride=1, shortcut_kernel=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            k = shortcut_kernel
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, k, stride=stride, padding=k // 2, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) in the REPAIR layout: conv1, bn1, layer{1,2,3}.{b}.*, linear."""

    def __init__(self, num_blocks=(3, 3, 3), w=1, num_classes=10, shortcut_kernel=3):
        super().__init__()
        self.in_planes = 16 * w
        self.conv1 = nn.Conv2d(3, 16 * w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16 * w)
        self.layer1 = self._make_layer(16 * w, num_blocks[0], 1, shortcut_kernel)
        self.layer2 = self._make_layer(32 * w, num_blocks[1], 2, shortcut_kernel)
        self.layer3 = self._make_layer(64 * w, num_blocks[2], 2, shortcut_kernel)
        self.linear = nn.Linear(64 * w, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes, n, stride, k):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s, k))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3]).flatten(1)
        return self.linear(out)


class NamedMLP(nn.Module):
    def __init__(self, sizes=(64, 32, 32, 10)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def seq_mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def seq_mlp_bn():
    return nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )


# name -> (constructor, family, input shape, description, {tensor: dtype} overrides)
MIXED = {"fc1.weight": torch.float16, "fc2.weight": torch.bfloat16, "fc3.bias": torch.float64}
MODELS = OrderedDict([
    ("resnet18", (lambda: torchvision.models.resnet18(num_classes=10), "torchvision-resnet",
                  (4, 3, 64, 64), "torchvision.models.resnet18(num_classes=10)", None)),
    ("resnet50", (lambda: torchvision.models.resnet50(num_classes=10), "torchvision-resnet",
                  (2, 3, 64, 64), "torchvision.models.resnet50(num_classes=10)", None)),
    ("vgg11_bn_small", (lambda: small_vgg(True), "torchvision-vgg", (4, 3, 32, 32),
                        "VGG(make_layers(%s, batch_norm=True)), classifier 3136-128-128-10"
                        % VGG11_SMALL_CFG, None)),
    ("vgg11_small", (lambda: small_vgg(False), "torchvision-vgg", (4, 3, 32, 32),
                     "VGG(make_layers(%s, batch_norm=False)), classifier 3136-128-128-10"
                     % VGG11_SMALL_CFG, None)),
    ("cifar_resnet20", (lambda: CifarResNet(w=2), "cifar-resnet", (4, 3, 32, 32),
                        "REPAIR resnet20(w=2), BatchNorm, 3x3 projection shortcut", None)),
    ("cifar_resnet20_k1", (lambda: CifarResNet(w=2, shortcut_kernel=1), "cifar-resnet",
                           (4, 3, 32, 32),
                           "kuangliu-style resnet20(w=2), BatchNorm, 1x1 projection shortcut", None)),
    ("mlp_seq", (seq_mlp, "sequential-mlp", (8, 64),
                 "nn.Sequential(Linear(64,32), ReLU, Linear(32,32), ReLU, Linear(32,10))", None)),
    ("mlp_seq_bn", (seq_mlp_bn, "sequential-mlp", (8, 64),
                    "nn.Sequential(Linear(64,32), BatchNorm1d, ReLU, Linear(32,32), BatchNorm1d, "
                    "ReLU, Linear(32,10))", None)),
    ("mlp_named", (NamedMLP, "named-mlp", (8, 64), "fc1 64->32, fc2 32->32, fc3 32->10", None)),
    ("mlp_named_mixed", (NamedMLP, "named-mlp", (8, 64),
                         "as mlp_named, stored with fc1.weight F16, fc2.weight BF16, fc3.bias F64",
                         MIXED)),
])

# Real-size torchvision models: tables only (meta device, no weights).
REAL = OrderedDict([
    ("tv_resnet34", ("resnet34", "torchvision-resnet")),
    ("tv_resnet101", ("resnet101", "torchvision-resnet")),
    ("tv_resnet152", ("resnet152", "torchvision-resnet")),
    ("tv_vgg13", ("vgg13", "torchvision-vgg")),
    ("tv_vgg16", ("vgg16", "torchvision-vgg")),
    ("tv_vgg19", ("vgg19", "torchvision-vgg")),
    ("tv_vgg16_bn", ("vgg16_bn", "torchvision-vgg")),
])


def _randomize(model, seed, input_shape, nbt_base, nbt_step):
    """Calibrate BN running stats on a random batch, then perturb every BN and bias."""
    g = torch.Generator().manual_seed(seed + 7)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        if bns:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: running stats = batch stats
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
            model.train()
            model(torch.randn(max(16, input_shape[0]), *input_shape[1:], generator=g))
            for i, m in enumerate(bns):
                n = m.num_features
                m.running_mean.add_(0.1 * torch.randn(n, generator=g) * m.running_var.sqrt())
                m.running_var.mul_(torch.empty(n).uniform_(0.7, 1.4, generator=g))
                m.num_batches_tracked.fill_(nbt_base + nbt_step * i)
                m.momentum = 0.1
        for name, p in model.named_parameters():
            if name.endswith("bias") and not any(p is m.bias for m in bns):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def build(name, seed):
    """Model `name` (a key of MODELS) with weights from `seed`, eval mode, float32."""
    ctor, _family, input_shape, _desc, _over = MODELS[name]
    torch.manual_seed(seed)
    model = ctor()
    which = 0 if seed == SEED_A else 1
    base, step = ((101, 3), (5003, 7))[which]
    return _randomize(model, seed, input_shape, base, step)


def fresh(name):
    """An untrained module of `name`'s structure to load_state_dict into."""
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def stored_state_dict(name, model):
    """The state dict as written to disk (dtype overrides applied, contiguous)."""
    over = MODELS[name][4] or {}
    return OrderedDict((k, v.detach().to(over.get(k, v.dtype)).contiguous().clone())
                       for k, v in model.state_dict().items())


def load_into(name, sd):
    """A fresh module with `sd` loaded (strict); float tensors are cast to the module's f32."""
    m = fresh(name)
    m.load_state_dict(OrderedDict(sd), strict=True)
    return m.eval()


def fixed_input(name):
    shape = MODELS[name][2]
    g = torch.Generator().manual_seed(424242)
    return torch.randn(*shape, generator=g)


@torch.no_grad()
def logits(model, x):
    return model.eval()(x).detach().float()


def table_of(sd):
    return [[k, ST_DTYPE[v.dtype], list(v.shape)] for k, v in sd.items()]


def write_table(name, family, source, sd, extra=None):
    os.makedirs(TABLES, exist_ok=True)
    obj = OrderedDict([("name", name), ("family", family), ("source", source)])
    if extra:
        obj.update(extra)
    obj["tensors"] = table_of(sd)
    path = os.path.join(TABLES, name + ".json")
    with open(path, "w") as f:
        # one tensor per line keeps diffs readable
        head = json.dumps(OrderedDict((k, v) for k, v in obj.items() if k != "tensors"), indent=1)
        rows = ",\n".join("  " + json.dumps(r) for r in obj["tensors"])
        f.write(head[:-2] + ',\n "tensors": [\n' + rows + "\n ]\n}\n")
    return path


def rebasin_resnet20_table(w=4, num_classes=10):
    """Git Re-Basin's flax ResNet-20 (src/resnet20.py), names joined by '.', flax layouts:
    Conv kernel (kh, kw, in, out) = HWIO, no conv bias; LayerNorm scale/bias (C,);
    Dense kernel (in, out), bias (out,). Order = flax init (call) order."""
    rows = []
    conv = lambda n, i, o: rows.append([n + ".kernel", "F32", [3, 3, i, o]])

    def norm(n, c):
        rows.append([n + ".scale", "F32", [c]])
        rows.append([n + ".bias", "F32", [c]])

    conv("conv1", 3, 16 * w)
    norm("norm1", 16 * w)
    cin = 16 * w
    for gi, c in enumerate((16 * w, 32 * w, 64 * w)):
        for bi in range(3):
            p = "blockgroups_%d.blocks_%d" % (gi, bi)
            stride = 2 if (gi > 0 and bi == 0) else 1
            conv(p + ".conv1", cin, c)
            norm(p + ".norm1", c)
            conv(p + ".conv2", c, c)
            norm(p + ".norm2", c)
            if stride != 1:
                conv(p + ".shortcut.layers_0", cin, c)
                norm(p + ".shortcut.layers_1", c)
            cin = c
    rows.append(["dense.kernel", "F32", [64 * w, num_classes]])
    rows.append(["dense.bias", "F32", [num_classes]])
    return rows


def write_rebasin_table():
    os.makedirs(TABLES, exist_ok=True)
    obj = OrderedDict([
        ("name", "rebasin_resnet20"),
        ("family", "rebasin-flax-resnet20"),
        ("source", "samuela/git-re-basin src/resnet20.py ResNet(blocks_per_group=(3,3,3), "
                   "num_classes=10, width_multiplier=4); flax param paths joined by '.'"),
        ("layout", "conv kernel HWIO (kh, kw, in, out), no conv bias; LayerNorm over channels "
                   "(scale, bias); dense kernel (in, out)"),
        ("width_multiplier", 4),
    ])
    path = os.path.join(TABLES, "rebasin_resnet20.json")
    with open(path, "w") as f:
        head = json.dumps(obj, indent=1)
        rows = ",\n".join("  " + json.dumps(r) for r in rebasin_resnet20_table())
        f.write(head[:-2] + ',\n "tensors": [\n' + rows + "\n ]\n}\n")
    return path


def write_tables():
    paths = []
    for name, (ctor, family, input_shape, desc, _over) in MODELS.items():
        torch.manual_seed(0)
        m = ctor()
        sd = stored_state_dict(name, m)
        paths.append(write_table(name, family, desc, sd,
                                 {"input_shape": list(input_shape)}))
    for name, (fn, family) in REAL.items():
        with torch.device("meta"):
            m = getattr(torchvision.models, fn)(weights=None, num_classes=1000)
        sd = OrderedDict((k, v) for k, v in m.state_dict().items())
        paths.append(write_table(name, family, "torchvision.models.%s(num_classes=1000)" % fn, sd))
    paths.append(write_rebasin_table())
    return paths


def write_models(out):
    from safetensors.torch import save_file
    for name in MODELS:
        x = fixed_input(name)
        for suffix, seed in (("", SEED_A), ("_b", SEED_B)):
            model = build(name, seed)
            sd = stored_state_dict(name, model)
            # logits of the model as stored (dtype overrides round-trip through load_into)
            y = logits(load_into(name, sd), x)
            d = os.path.join(out, name + suffix)
            os.makedirs(d, exist_ok=True)
            save_file(dict(sd), os.path.join(d, "model.safetensors"))
            save_file({"input": x.contiguous(), "logits": y.contiguous()},
                      os.path.join(d, "io.safetensors"))
            n = sum(v.numel() for v in sd.values())
            print("%-22s %9d elements  |logits|max %.3f  -> %s" % (name + suffix, n,
                                                                  y.abs().max().item(), d))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=DEFAULT_OUT, help="output dir (default %(default)s)")
    ap.add_argument("--tables-only", action="store_true", help="only write tables/*.json")
    ap.add_argument("--no-tables", action="store_true", help="do not rewrite tables/*.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if not args.no_tables:
        for p in write_tables():
            print("table", os.path.relpath(p, os.getcwd()))
    if not args.tables_only:
        write_models(args.out)


if __name__ == "__main__":
    sys.exit(main())
