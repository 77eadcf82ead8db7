import json

from jaxq.cli import main


def test_lp_cli_tables(capsys):
    assert main(["lp", "canonical"]) == 0
    out = capsys.readouterr().out
    assert "297.703170" in out and "298.586557" in out
    assert "M = ceil(n sum x*) = 107" in out and "= 108" in out
    assert "Prop 3.2" in out and "holds" in out
    assert "solo_capacity" in out and "active" in out


def test_lp_cli_json_and_n(capsys):
    assert main(["lp", "canonical", "--n", "20", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bundled"]["num_mixed"] == 5 and data["n"] == 20
    assert abs(data["bundled"]["value"] - 297.7032) < 1e-3


def test_lp_cli_infeasible_and_bad_args(capsys):
    assert main(["lp", "canonical", "--tpot", "0.01"]) == 1
    assert "infeasible" in capsys.readouterr().out
    assert main(["lp", "canonical", "--tpot", "0.03", "--tpot-penalty", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["lp", "no-such-scenario"]) == 2
