"""The README documents what the code has: every server setting, every shipped recipe."""

from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_server_setting_is_documented():
    missing = [name for name in Settings.model_fields if f"`HF_SERVE_{name.upper()}`" not in README]
    assert not missing, f"README's settings table lacks: {missing}"


def test_every_recipe_is_listed():
    recipes = (Path(__file__).resolve().parents[1] / "training" / "recipes").glob("*.yaml")
    missing = [r.stem for r in recipes if f"`{r.stem}`" not in README]
    assert not missing, f"README's recipe table lacks: {missing}"


def test_readme_starts_with_the_two_commands():
    head = README.split("\n## ")[0]
    assert "make demo" in head and "make test" in head
