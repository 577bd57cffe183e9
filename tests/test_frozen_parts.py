"""Frozen parts the training loop never runs wait in CPU memory, and come back for sampling; latents are cached in
batches sized by pixels. (On a GPU these keep SDXL LoRA's T4 recipe inside the card; here the loop proves that it
never calls what it parked, which is what would fail on a GPU if it did.)"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lib import data, lora
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.models import Components, tiny_components
from dreambooth_lib.train import train

DOG = Path(__file__).resolve().parent.parent / "data" / "subjects" / "dog"


@pytest.fixture
def watched(monkeypatch):
    """Record what train() parks, every call of a parked module, and whether it came while sampling (`on_device`)."""
    record = {"parked": [], "calls": [], "sampling": False}
    park, on_device = Components.park_frozen, Components.on_device

    def spy_park(self, **which):
        # Which modules parking sends to CPU memory (on a CPU they are there already: the move itself is the proof).
        moves, real_to = [], torch.nn.Module.to

        def recording_to(module, *args, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                moves.append(module)
            return real_to(module, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(torch.nn.Module, "to", recording_to)
            parked = park(self, **which)
        record["parked"] = parked
        record["moved_to_cpu"] = [module for module in parked if any(module is moved for moved in moves)]
        for module in parked:  # every submodule: the VAE is used through encode/decode, not its forward
            for part in module.modules():
                part.register_forward_pre_hook(lambda part, args: record["calls"].append(record["sampling"]))
        return parked

    def spy_on_device(self, device):
        inner = on_device(self, device)

        class Sampling:
            def __enter__(self):
                record["sampling"] = True
                return inner.__enter__()

            def __exit__(self, *exc):
                record["sampling"] = False
                return inner.__exit__(*exc)

        return Sampling()

    monkeypatch.setattr(Components, "park_frozen", spy_park)
    monkeypatch.setattr(Components, "on_device", spy_on_device)
    return record


def run(tmp_path: Path, kind: str, **overrides) -> list[dict]:
    config = TrainConfig.preset(
        "tiny-cpu",
        kind=kind,
        instance_dir=str(DOG),
        output_dir=str(tmp_path / "run"),
        with_prior_preservation=False,
        use_lora=True,
        max_steps=2,
        validation_steps=1,  # sampling inside the loop too: the parked parts must come back, then leave again
        num_validation_images=1,
        validation_inference_steps=1,
        **overrides,
    )
    return train(config).losses


@pytest.mark.parametrize(
    ("kind", "overrides", "parked"),
    [
        ("sdxl", dict(train_text_encoder=False), ["vae", "text_encoder", "text_encoder_2"]),
        ("sdxl", dict(train_text_encoder=True), ["vae"]),
        ("sd", dict(train_text_encoder=False, cache_latents=False), ["text_encoder"]),
    ],
)
def test_loop_never_runs_what_it_parked_and_sampling_brings_it_back(tmp_path, watched, kind, overrides, parked):
    losses = run(tmp_path, kind, **overrides)

    # The parked modules are train()'s own copies: match them by class and size, not identity.
    def signature(module):
        return type(module).__name__, sum(parameter.numel() for parameter in module.parameters())

    wanted = [signature(getattr(tiny_components(kind), name)) for name in parked]
    assert [signature(module) for module in watched["parked"]] == wanted
    assert watched["moved_to_cpu"] == watched["parked"]
    assert watched["calls"], "sampling never ran the parked modules: did on_device bring them back?"
    assert all(watched["calls"]), "the training loop called a module it had parked"
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in losses)


def test_trained_text_encoder_is_trained_with_frozen_parts_parked(tmp_path, watched):
    """LoRA on the text encoders while the VAE is parked: the encoders' adapters still learn."""
    run(tmp_path, "sdxl", train_text_encoder=True, learning_rate=1e-2)
    weights = load_file(tmp_path / "run" / lora.LORA_WEIGHTS_NAME)
    # LoRA's "up" (B) matrices start at zero: non-zero means an encoder's adapters trained. (Not every layer's: SDXL
    # reads the penultimate hidden states, so the first encoder's last layer gets no gradient.)
    for encoder in ("text_encoder.", "text_encoder_2."):
        ups = [value for key, value in weights.items() if key.startswith(encoder) and key.endswith("up.weight")]
        assert any(value.abs().sum() > 0 for value in ups), encoder


@pytest.mark.parametrize(("resolution", "calls"), [(512, [4, 1]), (1024, [1, 1, 1, 1, 1])])
def test_latent_cache_encodes_fewer_images_per_call_at_higher_resolution(resolution, calls, monkeypatch):
    vae = tiny_components("sd").vae
    seen = []
    moments = data.latent_moments

    def counting(vae, pixels):
        seen.append(len(pixels))
        return moments(vae, pixels[:, :, :64, :64])  # the count is what matters; keep the tiny VAE's work small

    monkeypatch.setattr(data, "latent_moments", counting)
    dataset = data.DreamBoothDataset(str(DOG), "a photo of sks dog", resolution=resolution)
    assert len(dataset.instance_images) == 5
    data.LatentCache.build(dataset, vae)
    assert seen == calls
