"""One command for the whole two-stage radar recipe: stage 1 (ControlNet), then stage 2 (UNet LoRA on the
frozen stage-1 ControlNet).

1. Stage 1 runs from --controlnet_config unless its output folder already holds a finished run
   (training_complete.json); --from_scratch trains it again. A half-finished stage continues from
   its newest state folder (every stage runs with --save_state, so --save_steps leaves states).
2. The stage-1 ControlNet path (and the base model, if the stage-2 config names none) is written
   into a copy of --lora_config: <name>_autofilled.<yaml|toml> beside it; stage 2 runs from that copy.
3. Stage 2 runs unless it already finished after this stage 1; it resumes the same way.
"""
from __future__ import annotations

from pathlib import Path

from library.controlnet import outputs
from library.controlnet.config import flag_values, load_raw, write_autofilled
from library.errors import UserError


def _settings(parser, path) -> dict:
    values = flag_values(parser, load_raw(path), path)
    if not values.get("output_dir"):
        raise UserError(f"the config {path} names no output folder.", path=path,
                        fix="set project.output_dir (or output_dir) in it.")
    return values


def run_pipeline(controlnet_config, lora_config, from_scratch: bool = False, extra: list[str] | None = None,
                 say=print) -> dict:
    from library.controlnet import cli
    from library.training.accel import reset_accelerate

    parser = cli.setup_parser()
    s1, s2 = _settings(parser, controlnet_config), _settings(parser, lora_config)
    out1, out2 = Path(s1["output_dir"]), Path(s2["output_dir"])
    if out1.resolve() == out2.resolve():
        raise UserError("both configs write into the same output folder.", path=lora_config,
                        fix="give the LoRA config its own project.output_dir (e.g. output/controlnet_lora).")
    extra = list(extra or [])
    ran_stage1 = False
    if outputs.is_complete(out1) and not from_scratch:
        say(f"pipeline: stage 1 already finished in {out1}; skipping it (--from_scratch trains it again).")
    else:
        resume = [] if from_scratch else ["--resume", "latest"]
        say(f"pipeline: stage 1 (ControlNet) from {controlnet_config} -> {out1}")
        cli.main(["--config_file", str(controlnet_config), "--save_state", *resume, *extra])
        reset_accelerate()
        ran_stage1 = True
    controlnet = out1 / "controlnet"
    updates = {"controlnet_path": str(controlnet.resolve()), "train_unet_lora": True}
    if not s2.get("pretrained_model_name_or_path") and s1.get("pretrained_model_name_or_path"):
        updates["pretrained_model_name_or_path"] = s1["pretrained_model_name_or_path"]
    autofilled = write_autofilled(lora_config, updates)
    say(f"pipeline: wrote {autofilled} (controlnet.path = {controlnet})")
    if outputs.is_complete(out2) and not ran_stage1:
        say(f"pipeline: stage 2 already finished in {out2}; nothing left to do.")
    else:
        if ran_stage1 and outputs.is_complete(out2):
            (out2 / outputs.COMPLETE_MARKER).unlink()  # trained on the old ControlNet: train it again
        resume = [] if ran_stage1 else ["--resume", "latest"]
        say(f"pipeline: stage 2 (UNet LoRA on the frozen ControlNet) from {autofilled} -> {out2}")
        cli.main(["--config_file", str(autofilled), "--save_state", *resume, *extra])
        reset_accelerate()
    say(f"pipeline: ControlNet in {controlnet}, LoRA in {out2 / 'lora'}")
    return {"controlnet": controlnet, "lora": out2 / "lora", "autofilled": autofilled, "ran_stage1": ran_stage1}
