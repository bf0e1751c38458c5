"""README's quickstart and CI must agree: CI runs exactly the README's test command."""

import re

from conftest import REPO


def _quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_exactly_two_command_lines():
    commands = _quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert commands[0].endswith("python -m ssl_kit fit --config configs/demo/mae.yaml")


def test_ci_runs_the_readme_test_command():
    test_command = _quickstart_commands()[1]
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_every_config_the_readme_names_exists():
    readme = (REPO / "README.md").read_text()
    for path in set(re.findall(r"(?:configs|eval)/[\w/.-]+\.yaml", readme)):
        assert (REPO / path).is_file(), path
