"""``idvault`` commands that make and check images: ``generate`` and ``verify``.

``generate`` needs the ML extra (torch, diffusers, transformers); the imports
happen inside the command so the rest of the CLI works without it. ``verify``
needs only the vault (Pillow and the public signing key).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import click

from vault import errors
from vault.config import Settings
from web.cli.common import open_vault, vault_options
from web.cli.progress import Progress, progress_option
from web.generation import METHOD_CHOICES

MODELS_HELP = ("Models folder with the identity methods' weights and, unless --base-model is "
               "given, the SDXL base model [env IDVAULT_MODELS; default: ~/.insightface].")


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    w, sep, h = value.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(w), int(h)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use WIDTHxHEIGHT, e.g. 1024x768",
                                 param_hint="--size") from None


@click.command()
@click.argument("prompt")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Where to write the PNG (with its signed provenance manifest).")
@click.option("--layout", default=None,
              help="One box per identity: 'ana=0,0,0.5,1;ben=0.5,0,1,1' or JSON (fractions of "
                   "the image, origin top-left). Default: vertical strips in order of mention.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
              help="Random seed (default: a random one, printed and recorded).")
@click.option("--steps", type=click.IntRange(1, 1000), default=30, show_default=True,
              help="Denoising steps.")
@click.option("--size", "size_text", default=None, metavar="WxH",
              help="Image size, multiples of 8 (default: the base model's, 1024x1024 for SDXL).")
@click.option("--method", "methods", multiple=True, default=("auto",), show_default=True,
              metavar="METHOD|@HANDLE=METHOD",
              help="Identity method: one for every identity, or per identity as "
                   "@owner/name=METHOD (repeat the option; mix methods in one image). "
                   f"Methods: {', '.join(METHOD_CHOICES)}; auto picks per the artifacts and "
                   "weights available.")
@click.option("--base-model", default=None, metavar="DIR_OR_HUB_NAME",
              help="SDXL base model: a diffusers folder or a Hugging Face name (default: the "
                   "first SDXL folder in the models folder).")
@click.option("--models", "models_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help=MODELS_HELP)
@click.option("--owner", "owner_name", default=None,
              help="Act for this owner: other owners' handles are refused as unknown.")
@click.option("--commercial", is_flag=True,
              help="The image is for commercial use: every identity's consent must grant it.")
@click.option("--negative", "negative_prompt", default=None, help="Negative prompt.")
@click.option("--guidance", "guidance_scale", type=float, default=5.0, show_default=True,
              help="Classifier-free guidance scale.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and timings as JSON.")
@progress_option("generate")
@vault_options
def generate(prompt: str, output: Path, layout: str | None, seed: int | None, steps: int,
             size_text: str | None, methods: tuple[str, ...], base_model: str | None,
             models_dir: Path | None, owner_name: str | None, commercial: bool,
             negative_prompt: str | None, guidance_scale: float, as_json: bool,
             progress: Progress, settings: Settings) -> None:
    """Compose one image from PROMPT, with @OWNER/NAME[:class] handles, and sign it.

    Consent (generate, and commercial with --commercial), ownership, the
    needed artifacts, the output path and the base model's folder are checked
    before any model work; every generation is an audit event. The PNG
    carries a signed provenance manifest (check it with `idvault verify`).

    \b
    Example (two people, each in their half, a fixed seed):
      idvault generate "@smiths/ana:woman and @smiths/ben:man on a beach" -o beach.png \\
          --seed 7
    """
    from generators.base_model import find_base_model
    from generators.preflight import preflight

    size = _size(size_text)
    method = parse_methods(methods)
    seed = secrets.randbelow(2**31) if seed is None else seed
    _check_output(output)
    with open_vault(settings) as vault:
        # Every check that needs no model, before torch is imported: an error arrives at
        # once, not after the ML stack and the base model load.
        preflight(vault, prompt, method=method, owner=owner_name, commercial=commercial)
        source = find_base_model(base_model, models_dir)
        progress.say("loading torch...")
        import torch

        from generators.compose import ComposePipeline

        # load_sdxl's default: half precision on CUDA, full on the CPU.
        dtype = "fp16" if torch.cuda.is_available() else "fp32"
        name = source.name if isinstance(source, Path) else source
        progress.say(f"loading base model {name} ({dtype})...")
        pipe = ComposePipeline.from_pretrained(source, vault=vault, models_dir=models_dir)
        phase = progress.phase("denoise", start="denoising {total} steps", done="denoised")
        progress.say("reading identities and encoding the prompt...", phase="prepare")
        with phase:
            result = pipe(prompt, owner=owner_name, layout=layout, seed=seed, steps=steps,
                          size=size, method=method, commercial=commercial,
                          negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                          progress=phase)
            phase.close(took=result.timings.get("denoise"))
        manifest = result.save(output)
    if as_json:
        click.echo(json.dumps({"output": str(output), "manifest": manifest,
                               "methods": result.methods,
                               "timings": {k: round(v, 4) for k, v in result.timings.items()}},
                              indent=2, sort_keys=True))
        return
    who = ", ".join(f"@{h} via {m}" for h, m in result.methods.items()) or "no identity"
    w, h = manifest["size"]
    click.echo(f"wrote {output} ({w}x{h}, seed {seed}, {steps} steps, "
               f"{result.timings['total']:.1f} s): {who}; base model "
               f"{manifest['base_model']}; signed provenance manifest")


def _check_output(output: Path) -> None:
    """The PNG can be written where ``-o`` says (a folder that exists and is writable)."""
    folder = output.parent
    if not folder.is_dir():
        raise errors.InvalidInput(f"{folder} is not a folder (-o {output})")
    if output.is_dir():
        raise errors.InvalidInput(f"-o {output} is a folder; name the PNG file to write")
    if not os.access(folder, os.W_OK | os.X_OK) or (output.exists()
                                                    and not os.access(output, os.W_OK)):
        raise errors.InvalidInput(f"-o {output}: not writable here (check the permissions of "
                                  f"{output if output.exists() else folder})")


def parse_methods(values: tuple[str, ...]) -> str | dict[str, str]:
    """``--method`` values -> ComposePipeline's ``method``: one name, or handle -> name."""
    single = [v for v in values if "=" not in v]
    per_identity: dict[str, str] = {}
    for value in values:
        if "=" not in value:
            continue
        handle, _, name = value.partition("=")
        handle = handle.strip().lstrip("@")
        if not handle or name.strip() not in METHOD_CHOICES:
            raise errors.InvalidInput(f"--method {value!r}: expected @owner/name=METHOD with "
                                      f"METHOD one of {', '.join(METHOD_CHOICES)}")
        if handle in per_identity:
            raise errors.InvalidInput(f"--method names @{handle} twice")
        per_identity[handle] = name.strip()
    for name in single:
        if name not in METHOD_CHOICES:
            raise errors.InvalidInput(f"--method {name!r} is not one of "
                                      f"{', '.join(METHOD_CHOICES)}")
    if per_identity:
        if [n for n in single if n != "auto"]:
            raise errors.InvalidInput("give --method either once for every identity or per "
                                      "identity as @owner/name=METHOD, not both")
        return per_identity
    if len(set(single)) > 1:
        raise errors.InvalidInput(f"--method given {len(single)} times: name one method, or "
                                  "one per identity as @owner/name=METHOD")
    return single[0] if single else "auto"


@click.command()
@click.argument("image", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@vault_options
def verify(image: Path, as_json: bool, settings: Settings) -> None:
    """Check IMAGE's provenance manifest: what made it, or that it was altered or signed by a
    key this vault does not hold. Exits 0 only when valid.

    \b
    Example:
      idvault verify beach.png
    """
    from generators.provenance import verify_image

    with open_vault(settings, check_keys=False) as vault:
        check = verify_image(vault, image)
    if as_json:
        click.echo(json.dumps({"status": check.status, "reason": check.reason,
                               "message": check.message, "key_id": check.key_id,
                               "manifest": check.manifest, "details": check.details},
                              indent=2, sort_keys=True, default=str))
    else:
        lines = check.summary()
        # The verdict of an invalid image goes to stderr as the error; its claims to stdout.
        for line in lines if check.ok else lines[1:]:
            click.echo(line)
    if not check.ok:
        raise errors.SignatureInvalid(check.message, status=check.status, reason=check.reason)


def register(cli: click.Group) -> None:
    for command in (generate, verify):
        cli.add_command(command)
