"""Bearer tokens that break the rules stop ``splitexport serve`` at startup with one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server import ServerSettings
from server._settings import MIN_TOKEN_LENGTH
from splitexport._cli import main
from tests._support import TOKEN, threaded_server

GOOD = "a-good-token-0123456789"


@pytest.mark.parametrize(("text", "message"), [
    ("short\n", f"line 1: a token has 5 characters; use at least {MIN_TOKEN_LENGTH}"),
    (f"# ops\n{GOOD}\nx\n", f"line 3: a token has 1 characters; use at least {MIN_TOKEN_LENGTH}"),
    (f"{GOOD}#rotated-2026\n", "line 1: a token contains '#'"),
    (f"{GOOD} {GOOD}\n", "line 1: a token contains ' '"),
    (f"{GOOD},{GOOD}x\n", "line 1: a token contains ','"),
])
def test_bad_tokens_file_is_refused_at_startup(mlp_bundle: Path, tmp_path: Path, capsys, text: str,
                                               message: str) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(text)
    code = main(["serve", str(mlp_bundle), "--state-dir", str(tmp_path / "s"), "--tokens", str(tokens),
                 "--port", "1"])  # never reached: the tokens are checked before anything listens
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("splitexport: error: ") and message in err, err
    assert "Traceback" not in err


def test_unreadable_tokens_file_is_one_line(mlp_bundle: Path, tmp_path: Path, capsys) -> None:
    """A missing file is an argument error (argparse exits 2); an unreadable one is refused at startup."""
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(mlp_bundle), "--state-dir", str(tmp_path / "s"), "--tokens", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "none does not exist" in err, err
    folder = tmp_path / "dir"
    folder.mkdir()
    settings_err = None
    try:
        ServerSettings(bundle=mlp_bundle, tokens_file=folder).token_set()
    except ValueError as e:
        settings_err = str(e)
    assert settings_err is not None and "cannot read the tokens file" in settings_err, settings_err


def test_short_environment_token_is_refused(mlp_bundle: Path) -> None:
    with pytest.raises(ValueError, match="SPLITEXPORT_TOKENS: a token has 3 characters"):
        ServerSettings(bundle=mlp_bundle, tokens=f"{GOOD},abc").token_set()


def test_comment_lines_and_blank_lines(mlp_bundle: Path, tmp_path: Path) -> None:
    """Only a line starting with '#' is a comment; every other line is a whole token, used as written."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# devices\n\n   # indented comment\n  {GOOD}  \n{TOKEN}\n")
    assert ServerSettings(bundle=mlp_bundle, tokens_file=tokens).token_set() == {GOOD, TOKEN}
    with threaded_server(mlp_bundle, tmp_path / "state", tokens_file=tokens) as (url, _):
        for token in (GOOD, TOKEN):
            assert httpx.post(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {token}"}).status_code == 201
        r = httpx.post(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {GOOD[:-1]}"})
        assert (r.status_code, r.json()["error"]["code"]) == (401, "bad_token")
