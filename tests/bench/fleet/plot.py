"""Draws fleet.png from the requests per minute that `fleet` writes (run.sh calls this)."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUTAGE_DAYS = (59, 60)  # as in tests/src/bin/fleet.rs
SHOWN = {"today": ("today's policy", "tab:red"), "P1+P2": ("proposal P1+P2", "tab:blue")}


def averages(counts, width):
    """Requests per minute averaged over buckets of `width` minutes, with each bucket's start day."""
    days, rates = [], []
    for start in range(0, len(counts) - width + 1, width):
        days.append(start / 1440)
        rates.append(sum(counts[start : start + width]) / width)
    return days, rates


def main(source, target):
    with open(source, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    columns = {name: [int(r[i]) for r in body] for i, name in enumerate(header) if name in SHOWN}

    fig, (whole, zoom) = plt.subplots(2, 1, figsize=(9, 6.4), dpi=80)
    for name, counts in columns.items():
        label, colour = SHOWN[name]
        whole.plot(*averages(counts, 60), color=colour, linewidth=0.7, label=label)
        zoom.plot(*averages(counts, 10), color=colour, linewidth=0.7, label=label)
    whole.set_title("100,000 devices enrolled within 1 h (day 0), 90-day certificates, CA down 24 h (shaded)")
    whole.set_ylabel("requests/min (hourly mean)")
    whole.set_xlim(-2, len(body) / 1440)
    zoom.set_ylabel("requests/min (10-min mean)")
    zoom.set_xlim(57, 66)
    zoom.set_xlabel("day")
    for ax in (whole, zoom):
        ax.set_yscale("log")
        ax.axvspan(*OUTAGE_DAYS, color="0.85")
        ax.grid(True, which="major", linewidth=0.3)
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
