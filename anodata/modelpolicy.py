"""The preprocessing policy of a model folder (e.g. models/ham64-cpu), for `prepare --model`.

A model folder holds `network.safetensors` and optionally `encoder.safetensors`. Its policy is
read as `anomaly.model.ano_model.AnoModel` reads it: the encoder's recorded policy, else the
network's, else the defaults (with a note), always at the network's resolution and channel count.
Only the checkpoints' metadata is read, never their tensors. A `splits.csv` in the folder is NOT
applied here: pass it to `prepare --splits-from` to reproduce the model's split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from anodata.policy import POLICY_KEY, Preprocessing
from stylegan.errors import UserError

NETWORK_FILE, ENCODER_FILE = "network.safetensors", "encoder.safetensors"
POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Preprocessing))


@dataclasses.dataclass(frozen=True)
class ModelPolicy:
    """A model folder's policy and where it came from."""

    policy: Preprocessing
    source: str  # 'the encoder', 'the network' or 'defaults'

    @property
    def note(self) -> str | None:
        """A warning when the folder records no policy (then the defaults are assumed)."""
        if self.source != "defaults":
            return None
        return ("the model records no preprocessing policy; assuming the defaults (center-crop, "
                "box filter, no colour normalisation) at its resolution")


def _body(path: Path, *, fmt: str) -> dict[str, Any]:
    """The JSON body of an AnoStyle safetensors checkpoint's metadata, checked by its schema
    (stylegan.schemas)."""
    from stylegan.checkpoint import read_metadata  # torch is imported only when needed
    from stylegan.schemas import (CheckpointMeta, EncoderBody, NetworkBody, json_field,
                                  validated)

    metadata = read_metadata(path)
    if metadata.get("format") != fmt or "anostyle" not in metadata:
        raise UserError(f"{path} is not an AnoStyle {fmt} checkpoint; a model folder holds "
                        f"{NETWORK_FILE} (and {ENCODER_FILE}) written by AnoStyle.")
    where, fix = f"The metadata of {path}", "the file is damaged"
    meta = validated(CheckpointMeta, metadata, where=where, fix=fix)
    schema = NetworkBody if fmt == "anostyle-networks" else EncoderBody
    body = json_field(meta.anostyle, where=where, fix=fix)
    return validated(schema, body, where=where, fix=fix).model_dump(exclude_unset=True)


def read_model_policy(model: str | Path) -> ModelPolicy:
    """The preprocessing policy recorded in a model folder (see the module docstring)."""
    model = Path(model)
    network = model / NETWORK_FILE
    if not network.is_file():
        raise UserError(f"--model {model} has no {NETWORK_FILE}; give a model folder such as "
                        f"models/ham64-cpu.")
    net = _body(network, fmt="anostyle-networks")
    configs = net.get("configs") or {}
    g = configs.get("G_ema") or configs.get("G") or {}
    if "img_resolution" not in g or "img_channels" not in g:
        raise UserError(f"{network} holds no generator configuration; give a full AnoStyle "
                        f"network snapshot.")
    from stylegan.checkpoint import config_from_dict
    from stylegan.networks import GeneratorConfig

    cfg = config_from_dict(GeneratorConfig, g, source=str(network))  # its schema's checks
    g = {"img_resolution": cfg.img_resolution, "img_channels": cfg.img_channels}
    extras = []
    if (model / ENCODER_FILE).is_file():
        extras.append(("the encoder", _body(model / ENCODER_FILE, fmt="anostyle-encoder")))
    extras.append(("the network", net))
    for what, body in extras:
        recorded = (body.get("extra") or {}).get(POLICY_KEY)
        if recorded is not None:
            policy = Preprocessing.from_dict(recorded, source=f"{model} ({what})")
            return ModelPolicy(policy.at(g["img_resolution"], g["img_channels"]), what)
    return ModelPolicy(Preprocessing().at(g["img_resolution"], g["img_channels"]), "defaults")


def policy_differences(policy: Preprocessing, other: Preprocessing) -> list[str]:
    """'name a (not b)' for every field where `other` differs from `policy`."""
    return [f"{name.replace('_', '-')} {getattr(other, name)} (the model's: "
            f"{getattr(policy, name)})"
            for name in POLICY_FIELDS if getattr(other, name) != getattr(policy, name)]


def policy_for_model(model: str | Path, given: dict[str, Any]) -> ModelPolicy:
    """The model folder's policy; a given setting (policy field -> value) that differs from it
    is a UserError naming the setting."""
    found = read_model_policy(model)
    unknown = sorted(set(given) - set(POLICY_FIELDS))
    assert not unknown, unknown
    asked = dataclasses.replace(found.policy, **given)
    differences = policy_differences(found.policy, asked)
    if differences:
        raise UserError(f"--model {model} was trained on images prepared with another policy: "
                        f"{'; '.join(differences)}; leave these settings out to use the model's.")
    return found


def check_policy_matches(model: str | Path, policy: Preprocessing) -> None:
    """Refuse a policy that differs from the model folder's (one sentence naming the fields)."""
    policy_for_model(model, {name: getattr(policy, name) for name in POLICY_FIELDS})
