"""The benchmarks' records and the README: every table between the results markers is
rendered from bench/results/*.json, so a record changed without re-rendering fails here."""

from bench import render_table


def test_the_readme_tables_are_rendered_from_the_records():
    text = render_table.README.read_text(encoding="utf-8")
    _, _, rest = text.partition(render_table.START)
    rendered, found, _ = rest.partition(render_table.END)
    assert found, f"{render_table.END} is missing from README.md"
    assert render_table.START + rendered + render_table.END == render_table.render(), (
        "README.md's results are not the records': run python -m bench.render_table"
    )
