"""A hospital's privacy budget for the whole federation, enforced by the hospital itself.

The budget (ε, δ) is the site's own setting (its node config), never the server's. Before the
first private round the noise multiplier is calibrated once, with Opacus' accountant utilities,
so that the planned number of rounds ends at most at the target ε. Every round that trains
appends an entry to the ledger (``STATE/privacy-ledger.json``): noise multiplier, sample rate,
steps, cumulative ε at δ, the accountant, time and model version. The accountant's history is
rebuilt from the ledger on every start, so a restarted client continues the same budget; a
missing-but-expected or corrupted ledger stops training instead of silently starting at zero.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedct.common.errors import ConfigError, FedCTError
from fedct.common.fileio import atomic_write_text

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
MARKER_FILE = "fedct-site.json"  # written with the first ledger; its presence means "expected"
LEDGER_VERSION = 1
ACCOUNTANTS = ("rdp", "prv", "gdp")


class LedgerError(FedCTError):
    """The ledger cannot be trusted; training must stop until a person looks at it."""


class BudgetExhaustedError(FedCTError):
    """Training this round would take the site past its privacy budget."""


@dataclass(frozen=True)
class PrivacyBudget:
    epsilon: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ConfigError(f"privacy epsilon must be positive, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
            )


def default_delta(num_patients: int) -> float:
    """δ well below 1/N for N training patients (the usual requirement), capped at 1e-5."""
    return min(1e-5, 0.1 / max(num_patients, 1))


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # cumulative, over every round this site trained in
    delta: float
    accountant: str
    timestamp: str
    model_version: str


@dataclass
class Ledger:
    """The site's record of spent privacy. Use :meth:`open` and :meth:`record`."""

    path: Path
    budget: PrivacyBudget
    noise_multiplier: float | None = None  # calibrated once, then fixed
    planned_rounds: int | None = None
    entries: list[LedgerEntry] = field(default_factory=list)

    @classmethod
    def open(cls, state_dir: Path, budget: PrivacyBudget) -> Ledger:
        """Load the site's ledger, or start one if this state folder never had one."""
        path, marker = state_dir / LEDGER_FILE, state_dir / MARKER_FILE
        if not path.exists():
            if marker.exists():
                raise LedgerError(
                    f"the privacy ledger {path} is missing, but {marker} says this site has "
                    "trained before. FedCT will not restart the budget at zero: restore the "
                    "ledger from backup (or, if the site truly starts over with new data, "
                    "remove the state folder on purpose)."
                )
            state_dir.mkdir(parents=True, exist_ok=True)
            ledger = cls(path, budget)
            ledger._save()
            atomic_write_text(marker, json.dumps({"ledger": LEDGER_FILE}, indent=2))
            return ledger
        return cls._load(path, budget)

    @classmethod
    def _load(cls, path: Path, budget: PrivacyBudget) -> Ledger:
        body, entries = _read_verified(path)
        accountant = body.get("accountant", budget.accountant)
        if entries and entries[0].delta != budget.delta:
            # δ is fixed for the life of a budget (it was chosen from the site's size at the
            # first round); a different δ now would make the cumulative ε meaningless.
            log.info(
                "keeping the ledger's δ=%g (configured now: %g)", entries[0].delta, budget.delta
            )
            budget = dataclasses.replace(budget, delta=entries[0].delta)
        if entries and accountant != budget.accountant:
            raise LedgerError(
                f"{path} was kept with the {accountant!r} accountant but the site is now "
                f"configured for {budget.accountant!r}; accountants cannot be mixed mid-budget"
            )
        return cls(path, budget, body.get("noise_multiplier"), body.get("planned_rounds"), entries)

    @property
    def spent_epsilon(self) -> float:
        return self.entries[-1].epsilon if self.entries else 0.0

    @property
    def last_round(self) -> int | None:
        return self.entries[-1].round if self.entries else None

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history ``(noise multiplier, sample rate, steps)`` of every round."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Cumulative ε if one more round of ``steps`` steps were trained."""
        return epsilon_of(
            [*self.history(), (noise_multiplier, sample_rate, steps)],
            delta=self.budget.delta,
            accountant=self.budget.accountant,
        )

    def calibrate(self, *, sample_rate: float, steps_per_round: int, planned_rounds: int) -> float:
        """The noise multiplier that spends the budget by ``planned_rounds`` rounds (fixed on
        first use; later calls return the stored value)."""
        if self.noise_multiplier is None:
            if steps_per_round < 1 or planned_rounds < 1:
                raise ConfigError("steps per round and planned rounds must be at least 1")
            sigma = calibrate_noise(
                self.budget, sample_rate=sample_rate, steps=steps_per_round * planned_rounds
            )
            self.noise_multiplier = float(sigma)
            self.planned_rounds = planned_rounds
            self._save()
            log.info(
                "calibrated noise multiplier %.3f for ε=%g over %d rounds",
                sigma,
                self.budget.epsilon,
                planned_rounds,
            )
        return self.noise_multiplier

    def check(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise :class:`BudgetExhaustedError` if the round would exceed the budget, else
        return the ε after it."""
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if after > self.budget.epsilon * (1 + 1e-9):
            raise BudgetExhaustedError(
                f"privacy budget exhausted: ε spent {self.spent_epsilon:.3f} of "
                f"{self.budget.epsilon:g}; one more round would reach {after:.3f}"
            )
        return after

    def record(
        self,
        *,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        model_version: str,
    ) -> LedgerEntry:
        entry = LedgerEntry(
            round=round,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            epsilon=self.epsilon_after(noise_multiplier, sample_rate, steps),
            delta=self.budget.delta,
            accountant=self.budget.accountant,
            timestamp=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            model_version=model_version,
        )
        self.entries.append(entry)
        self._save()
        return entry

    def _save(self) -> None:
        body: dict[str, Any] = {
            "version": LEDGER_VERSION,
            "accountant": self.budget.accountant,
            "noise_multiplier": self.noise_multiplier,
            "planned_rounds": self.planned_rounds,
            "entries": [asdict(e) for e in self.entries],
        }
        atomic_write_text(self.path, json.dumps({**body, "checksum": _checksum(body)}, indent=2))


def read_entries(state_dir: Path) -> list[LedgerEntry]:
    """The verified entries of a site's ledger (for reports; the budget is not needed)."""
    path = state_dir / LEDGER_FILE
    if not path.is_file():
        raise LedgerError(f"no privacy ledger in {state_dir} (expected {path})")
    return _read_verified(path)[1]


def _read_verified(path: Path) -> tuple[dict[str, Any], list[LedgerEntry]]:
    try:
        data = json.loads(path.read_text())
        body = {k: v for k, v in data.items() if k != "checksum"}
        if data.get("checksum") != _checksum(body):
            raise ValueError("checksum mismatch (the file was edited or damaged)")
        if body.get("version") != LEDGER_VERSION:
            raise ValueError(f"unsupported ledger version {body.get('version')!r}")
        return body, [LedgerEntry(**e) for e in body["entries"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise LedgerError(
            f"the privacy ledger {path} is corrupted ({err}). Training is refused so the "
            "budget is never silently reset; restore the ledger from backup."
        ) from err


# Opacus' default RDP orders stop at 63. With few steps at a high sampling rate (small sites,
# few rounds) the best order is larger and the default bound is looser than it needs to be
# (Opacus warns "Optimal order is the largest alpha"); these orders extend its defaults.
RDP_ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + [
        80,
        96,
        128,
        192,
        256,
        384,
        512,
        1024,
    ]
)


def _orders(accountant: str) -> dict[str, Any]:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


def calibrate_noise(budget: PrivacyBudget, *, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (within 0.01 in ε) that keeps ``steps`` DP-SGD steps at
    ``sample_rate`` within ``budget``, by Opacus' accountant."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=budget.epsilon,
                target_delta=budget.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=budget.accountant,
                epsilon_tolerance=0.01,
                **_orders(budget.accountant),
            )
        )
    except ValueError as err:
        raise ConfigError(f"cannot reach ε={budget.epsilon} at δ={budget.delta}: {err}") from err


def epsilon_of(history: list[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """ε at ``delta`` of a whole accountant history, by Opacus' accountant."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta, **_orders(accountant)))


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
