"""Numbers a user or a checkpoint hands us: sampling settings, seeds, and logits that are not numbers."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillava import generate as gen
from tests.test_generate import one_error_line, run_cli

NAN, INF = float("nan"), float("inf")


def test_unusable_logits_give_the_bad_token_not_an_id():
    logits = torch.tensor([
        [0.0, 1.0, 2.0],  # fine
        [0.0, NAN, 2.0],  # NaN anywhere
        [0.0, INF, 2.0],  # +inf
        [-INF, -INF, -INF],  # nothing left to pick
        [-INF, 3.0, -INF],  # -inf entries are masked tokens: fine
    ])
    assert gen.sample(logits, 0.0, 1.0, None).tolist() == [2, gen.BAD_TOKEN, gen.BAD_TOKEN, gen.BAD_TOKEN, 1]
    ties = torch.tensor([[1.0, 5.0, 5.0, 0.0], [7.0, 7.0, 7.0, 7.0]])  # greedy: argmax's id, the first of equals
    assert gen.sample(ties, 0.0, 1.0, None).tolist() == ties.argmax(-1).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    ids = gen.sample(logits, 1.0, 0.9, g).tolist()  # multinomial must not choke on the bad rows
    assert ids[1:4] == [gen.BAD_TOKEN] * 3 and ids[4] == 1 and 0 <= ids[0] <= 2


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 5e-324])
def test_a_tiny_temperature_is_greedy_not_an_overflow(temperature):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 30
    g = torch.Generator().manual_seed(0)
    assert torch.equal(gen.sample(logits, temperature, 0.9, g), logits.argmax(-1))
    assert torch.equal(gen.sample(logits, temperature, 1.0, g), logits.argmax(-1))


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "nan", "finite"),
    ("--temperature", "inf", "finite"),
    ("--temperature", "-0.5", "finite"),
    ("--temperature", "warm", "not a number"),
    ("--top-p", "nan", "--top-p"),
    ("--seed", str(2**64), "2**63"),
    ("--seed", str(2**63), "2**63"),
    ("--seed", "-1", "2**63"),
    ("--seed", "1.5", "not an integer"),
])
def test_bad_numbers_are_refused_by_the_parser(capsys, flag, value, needle):
    with pytest.raises(SystemExit) as exit_info:
        gen.parse_args(["--image", "x.png", "--prompt", "q", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err.strip().splitlines()[-1]


def test_the_largest_seed_samples(capsys, checkpoints, image_path):
    code, out, err = run_cli(capsys, "--model", checkpoints["hub"], "--image", image_path, "--prompt", "Hi",
                             "--max-new-tokens", 3, "--temperature", 1.0, "--seed", 2**63 - 1,
                             "--compressor", "random", "--json")
    assert code == 0, err


def test_nan_weights_are_an_error_not_token_zero(capsys, checkpoints, image_path, tmp_path):
    """A checkpoint whose logits come out NaN must not be 'answered' with token 0 and exit 0."""
    broken = shutil.copytree(checkpoints["hub"], tmp_path / "nan-model")
    for shard in broken.glob("*.safetensors"):
        weights = load_file(shard)
        final_norm = [k for k in weights if k.endswith("model.norm.weight")]  # the decoder's final norm
        for key in final_norm:
            weights[key] = torch.full_like(weights[key], NAN)
        save_file(weights, shard, metadata={"format": "pt"})
    for extra in ((), ("--temperature", 0.7)):
        code, out, err = run_cli(capsys, "--model", broken, "--image", image_path, "--prompt", "Hi",
                                 "--max-new-tokens", 3, *extra)
        one_error_line(code, err, "NaN or infinite", "--dtype")
        assert out.strip() == ""
