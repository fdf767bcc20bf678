"""The README's main job, `make demo` (python -m zmqfed.demo), run as a user would."""

from __future__ import annotations

import re
import struct


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_demo_reaches_the_target_accuracy_and_plots(run_python, tmp_path, slow_factor):
    out_dir = tmp_path / "demo"
    proc = run_python(module="zmqfed.demo", args=["--out", str(out_dir)])
    out, err = proc.communicate(timeout=600 * slow_factor)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    text = out + err
    match = re.search(r"final held-out accuracy: (0\.\d+) after (\d+) rounds", text)
    assert match, text[-2000:]
    assert float(match.group(1)) >= 0.90
    assert int(match.group(2)) == 20
    # one table line per round: round, accuracy, loss, 8 clients, kB in/out, seconds
    rows = re.findall(r"^\s*(\d+)\s+(0\.\d{4})\s+\d+\.\d{4}\s+8\s", text, re.MULTILINE)
    assert [int(r[0]) for r in rows] == list(range(1, 21))
    png = out_dir / "demo.png"
    width, height = _png_size(png.read_bytes())
    assert (width, height) == (1000, 400)


def test_demo_with_central_dp_stops_at_the_target_epsilon(run_python, tmp_path, slow_factor):
    # noise 0.5, 8 collaborators, all in every round: epsilon 10.7, 16.5, 21.4, 25.9 (delta 1e-5)
    proc = run_python(
        module="zmqfed.demo",
        args=[
            "--out",
            str(tmp_path / "demo"),
            "--rounds",
            "6",
            "--dp",
            "central",
            "--target-epsilon",
            "24",
            "--min-accuracy",
            "0",
        ],
    )
    out, err = proc.communicate(timeout=600 * slow_factor)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    text = out + err
    assert "central DP (noise 0.5, clip 1.0)" in text
    # one table line per round, epsilon last; the third round is the last that fits
    rows = re.findall(
        r"^\s*(\d+)\s+0\.\d{4}\s+\d+\.\d{4}\s+8\s.*\s(\d+\.\d{3})$", text, re.MULTILINE
    )
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert [round(float(r[1]), 1) for r in rows] == [10.7, 16.5, 21.4]
    assert re.search(r"after 3 rounds, \(21\.4, 1e-05\)-DP \(central\)", text), text[-2000:]


def test_demo_with_dp_sgd_reports_record_level_epsilon(run_python, tmp_path, slow_factor):
    proc = run_python(
        module="zmqfed.demo",
        args=[
            "--out",
            str(tmp_path / "demo"),
            "--rounds",
            "2",
            "--dp",
            "dpsgd",
            "--min-accuracy",
            "0",
        ],
    )
    out, err = proc.communicate(timeout=600 * slow_factor)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    rows = re.findall(
        r"^\s*(\d+)\s+0\.\d{4}\s+\d+\.\d{4}\s+8\s.*\s(\d+\.\d{3})$", out + err, re.MULTILINE
    )
    assert [int(r[0]) for r in rows] == [1, 2]
    assert 0 < float(rows[0][1]) < float(rows[1][1])  # record-level epsilon grows with rounds
