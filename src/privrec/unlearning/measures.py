"""Measures of forgetting: the one module every unlearning method in privrec reports with (METHODS §5, §7).

Everything here is a plain function over arrays of labels and P(Yes) (no model, no torch), so each measure is
tested against hand-computed values and is shared by approximate unlearning (E2URec, NegGrad, Bad-Teacher),
retraining and exact unlearning (APA). The key names written to ``metrics.json`` are the constants listed in
``docs/unlearning.md``; :func:`forgetting_measures` produces all of them at once.

Quality: AUC / LogLoss / accuracy on the test set and on the forget set (``privrec.metrics``).

Distance from the retrained model on the forget set (METHODS §5), per sample on the two-outcome
distribution Bernoulli(P(Yes)) and averaged over samples, in nats:
- symmetric KL = 1/2 [KL(p || q) + KL(q || p)]: what E2URec's released evaluation code calls "JSD";
- Jensen-Shannon = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2: the true JSD, 0 <= JSD <= ln 2.

Membership inference (METHODS §7), shadow-free: the attacker fits on the unlearned model's outputs for
samples it knows were trained on (retained training samples) and samples it knows were not (never-seen
samples of other users), then guesses "member" or not for the forgotten samples and for further never-seen
samples. The reported accuracy is the balanced accuracy of that guess with forgotten samples counted as
members: 1/2 [P(guess member | forgotten) + P(guess non-member | never-seen)]. A model that still remembers
the forget set scores near 1; a model that treats forgotten samples like never-seen ones scores 0.5
whatever the attacker's threshold (chance), as the model retrained without them does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privrec.metrics import EPS, accuracy, auc, binary_metrics, logloss

# --- metrics.json keys (documented in docs/unlearning.md) ---------------------------------------------------
TEST_AUC, TEST_UAUC, TEST_LOGLOSS, TEST_ACC = "test_auc", "test_uauc", "test_logloss", "test_accuracy"
FORGET_AUC, FORGET_LOGLOSS, FORGET_ACC = "forget_auc", "forget_logloss", "forget_accuracy"
RETAIN_AUC, RETAIN_LOGLOSS = "retain_auc", "retain_logloss"
KL_SYM, JSD = "kl_sym_vs_retrain", "jsd_vs_retrain"
MIA_LOSS_ACC, MIA_LOSS_FORGET_RATE = "mia_loss_accuracy", "mia_loss_forget_member_rate"
MIA_LOSS_UNSEEN_RATE, MIA_LOSS_FIT_ACC = "mia_loss_unseen_member_rate", "mia_loss_fit_accuracy"
MIA_LR_ACC, MIA_LR_FORGET_RATE = "mia_logistic_accuracy", "mia_logistic_forget_member_rate"
MIA_LR_UNSEEN_RATE, MIA_LR_FIT_ACC = "mia_logistic_unseen_member_rate", "mia_logistic_fit_accuracy"
UNLEARN_SECONDS, SPEEDUP = "unlearn_seconds", "speedup_vs_retrain"


# --- divergences of Bernoulli(P(Yes)) distributions ---------------------------------------------------------
def _probs(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    return p


def bernoulli_kl(p, q) -> np.ndarray:
    """Per sample KL(Ber(p) || Ber(q)) = p ln(p/q) + (1-p) ln((1-p)/(1-q)), nats; p, q clipped to [1e-7, 1-1e-7]
    (a model that is certain makes KL infinite otherwise)."""
    p = np.clip(_probs(p), EPS, 1 - EPS)
    q = np.clip(_probs(q), EPS, 1 - EPS)
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def symmetric_kl(p, q) -> float:
    """mean_i 1/2 [KL(Ber(p_i) || Ber(q_i)) + KL(Ber(q_i) || Ber(p_i))] (the "JSD" of E2URec's released code)."""
    if len(p) != len(q):
        raise ValueError(f"p and q differ in length ({len(p)} vs {len(q)})")
    if len(p) == 0:
        return float("nan")
    return float(np.mean(0.5 * (bernoulli_kl(p, q) + bernoulli_kl(q, p))))


def _xlogy_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a ln(a / b) with 0 ln(0 / b) = 0 (b > 0 wherever a > 0)."""
    out = np.zeros_like(a)
    nz = a > 0
    out[nz] = a[nz] * np.log(a[nz] / b[nz])
    return out


def jensen_shannon_per_sample(p, q) -> np.ndarray:
    """Per sample JSD(Ber(p), Ber(q)) = 1/2 KL(P || M) + 1/2 KL(Q || M), M = (P + Q)/2, nats, exact (no
    clipping: M > 0 wherever P or Q is), so 0 <= JSD <= ln 2 with ln 2 only for p, q = 0, 1."""
    p, q = _probs(p), _probs(q)
    m = 0.5 * (p + q)
    kl_pm = _xlogy_ratio(p, m) + _xlogy_ratio(1 - p, 1 - m)
    kl_qm = _xlogy_ratio(q, m) + _xlogy_ratio(1 - q, 1 - m)
    return 0.5 * kl_pm + 0.5 * kl_qm


def jensen_shannon(p, q) -> float:
    """mean_i JSD(Ber(p_i), Ber(q_i)), nats."""
    if len(p) != len(q):
        raise ValueError(f"p and q differ in length ({len(p)} vs {len(q)})")
    if len(p) == 0:
        return float("nan")
    return float(np.mean(jensen_shannon_per_sample(p, q)))


# --- membership inference ----------------------------------------------------------------------------------
def sample_loss(labels, probs) -> np.ndarray:
    """Per sample cross-entropy -[y ln p + (1-y) ln(1-p)], p clipped to [1e-7, 1-1e-7]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@dataclass(frozen=True)
class Outputs:
    """What the attacker (and every measure) sees of one model on one sample set: labels and P(Yes)."""

    labels: np.ndarray
    probs: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.float64))
        object.__setattr__(self, "probs", np.asarray(self.probs, dtype=np.float64))
        if self.labels.shape != self.probs.shape:
            raise ValueError(f"labels {self.labels.shape} and probs {self.probs.shape} differ in shape")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def loss(self) -> np.ndarray:
        return sample_loss(self.labels, self.probs)

    def features(self) -> np.ndarray:
        """(N, 3) attack features: P(Yes), loss, ln(loss) (the log spreads the small losses of members)."""
        loss = self.loss
        return np.stack([self.probs, loss, np.log(loss)], axis=1)


@dataclass(frozen=True)
class MiaSets:
    """The unlearned model's outputs on the four sets of the attack.

    members_fit: retained training samples (known members); unseen_fit: never-seen samples the attacker
    fits on (known non-members); forget: the forgotten samples; unseen_eval: further never-seen samples,
    disjoint from unseen_fit, ideally of the same users as the forget set (so that for the retrained model
    forget and unseen_eval are exchangeable and the attack is at chance)."""

    members_fit: Outputs
    unseen_fit: Outputs
    forget: Outputs
    unseen_eval: Outputs


def balanced_attack_accuracy(member_guess_forget, member_guess_unseen) -> float:
    """1/2 [mean(guess member | forgotten) + mean(guess non-member | never seen)]; 0.5 = chance."""
    f = np.asarray(member_guess_forget, dtype=bool)
    u = np.asarray(member_guess_unseen, dtype=bool)
    if len(f) == 0 or len(u) == 0:
        return float("nan")
    return float(0.5 * (f.mean() + (1 - u.mean())))


def fit_loss_threshold(member_loss, unseen_loss) -> float:
    """The threshold t of the rule "member iff loss <= t" with the best balanced accuracy on the fit sets.

    Candidates: midpoints between consecutive distinct losses (and below the smallest), so the chosen
    threshold never sits on a fit sample; ties broken towards the smaller threshold."""
    m = np.sort(np.asarray(member_loss, dtype=np.float64))
    u = np.sort(np.asarray(unseen_loss, dtype=np.float64))
    if len(m) == 0 or len(u) == 0:
        raise ValueError("the loss-threshold attack needs members and non-members to fit on")
    values = np.unique(np.concatenate([m, u]))
    cands = np.concatenate([[values[0] - 1.0], 0.5 * (values[1:] + values[:-1]), [values[-1] + 1.0]])
    tpr = np.searchsorted(m, cands, side="right") / len(m)  # members with loss <= t
    fpr = np.searchsorted(u, cands, side="right") / len(u)
    return float(cands[int(np.argmax(0.5 * (tpr + 1 - fpr)))])


def loss_threshold_attack(sets: MiaSets) -> dict[str, float]:
    """Guess "member" when the sample's loss is below a threshold fit on members_fit vs unseen_fit."""
    t = fit_loss_threshold(sets.members_fit.loss, sets.unseen_fit.loss)
    guess_f, guess_u = sets.forget.loss <= t, sets.unseen_eval.loss <= t
    return {MIA_LOSS_ACC: balanced_attack_accuracy(guess_f, guess_u),
            MIA_LOSS_FORGET_RATE: float(guess_f.mean()) if len(guess_f) else float("nan"),
            MIA_LOSS_UNSEEN_RATE: float(guess_u.mean()) if len(guess_u) else float("nan"),
            MIA_LOSS_FIT_ACC: balanced_attack_accuracy(sets.members_fit.loss <= t, sets.unseen_fit.loss <= t),
            "mia_loss_threshold": t}


def logistic_attack(sets: MiaSets, seed: int = 0) -> dict[str, float]:
    """Logistic regression on (P(Yes), loss, ln loss), standardised, classes weighted to balance, fit on
    members_fit vs unseen_fit; guesses "member" where its probability exceeds 1/2."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([sets.members_fit.features(), sets.unseen_fit.features()])
    y = np.concatenate([np.ones(len(sets.members_fit)), np.zeros(len(sets.unseen_fit))])
    if len(np.unique(y)) < 2:
        raise ValueError("the logistic attack needs members and non-members to fit on")
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", random_state=seed,
                                                             max_iter=1000))
    clf.fit(x, y)

    def guess(o: Outputs) -> np.ndarray:
        return clf.predict_proba(o.features())[:, 1] > 0.5 if len(o) else np.zeros(0, dtype=bool)

    guess_f, guess_u = guess(sets.forget), guess(sets.unseen_eval)
    return {MIA_LR_ACC: balanced_attack_accuracy(guess_f, guess_u),
            MIA_LR_FORGET_RATE: float(guess_f.mean()) if len(guess_f) else float("nan"),
            MIA_LR_UNSEEN_RATE: float(guess_u.mean()) if len(guess_u) else float("nan"),
            MIA_LR_FIT_ACC: balanced_attack_accuracy(guess(sets.members_fit), guess(sets.unseen_fit))}


def membership_inference(sets: MiaSets, seed: int = 0) -> dict[str, float]:
    """Both attacks; set sizes under ``mia_n_*``."""
    out = {"mia_n_members_fit": len(sets.members_fit), "mia_n_unseen_fit": len(sets.unseen_fit),
           "mia_n_forget": len(sets.forget), "mia_n_unseen_eval": len(sets.unseen_eval)}
    out.update(loss_threshold_attack(sets))
    out.update(logistic_attack(sets, seed))
    return out


# --- everything at once ------------------------------------------------------------------------------------
def forgetting_measures(test: Outputs, forget: Outputs, *, test_users=None, retain: Outputs | None = None,
                        mia: MiaSets | None = None, reference_forget_probs=None, seconds: float | None = None,
                        reference_seconds: float | None = None, seed: int = 0) -> dict:
    """Every measure of METHODS §5/§7 under its metrics.json key; measures whose inputs are missing are None.

    Args:
        test, forget: the unlearned model's outputs on the test set and on the forgotten samples.
        retain: its outputs on (a subset of) the retained training samples.
        mia: the four sets of the membership-inference attack.
        reference_forget_probs: the retrained model's P(Yes) on the same forgotten samples, same order.
        seconds / reference_seconds: wall-clock of this unlearning and of retraining.
    """
    t = binary_metrics(test.labels, test.probs, test_users)
    out: dict = {TEST_AUC: t["auc"], TEST_UAUC: t.get("uauc"), TEST_LOGLOSS: t["logloss"],
                 TEST_ACC: t["accuracy"], "n_test": len(test),
                 FORGET_AUC: auc(forget.labels, forget.probs), FORGET_LOGLOSS: logloss(forget.labels, forget.probs),
                 FORGET_ACC: accuracy(forget.labels, forget.probs), "n_forget": len(forget),
                 RETAIN_AUC: None, RETAIN_LOGLOSS: None, KL_SYM: None, JSD: None}
    if retain is not None and len(retain):
        out[RETAIN_AUC], out[RETAIN_LOGLOSS] = auc(retain.labels, retain.probs), logloss(retain.labels, retain.probs)
    if reference_forget_probs is not None:
        ref = np.asarray(reference_forget_probs, dtype=np.float64)
        if ref.shape != forget.probs.shape:
            raise ValueError(f"reference predictions cover {ref.shape} forget samples, not {forget.probs.shape}")
        out[KL_SYM], out[JSD] = symmetric_kl(forget.probs, ref), jensen_shannon(forget.probs, ref)
    if mia is not None:
        out.update(membership_inference(mia, seed))
    out[UNLEARN_SECONDS] = seconds
    out[SPEEDUP] = (reference_seconds / seconds if seconds and reference_seconds is not None and seconds > 0
                    else None)
    return out


# --- the comparison table ----------------------------------------------------------------------------------
COLUMNS: list[tuple[str, str]] = [
    (TEST_AUC, "test AUC"), (TEST_LOGLOSS, "test LL"), (TEST_ACC, "test ACC"),
    (FORGET_AUC, "forget AUC"), (FORGET_LOGLOSS, "forget LL"),
    (KL_SYM, "sym-KL vs retrain"), (JSD, "JSD vs retrain"),
    (MIA_LOSS_ACC, "MIA loss acc"), (MIA_LR_ACC, "MIA logistic acc"),
    (UNLEARN_SECONDS, "seconds"), (SPEEDUP, "x retrain speed"),
]


def _fmt(v, key: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if key == UNLEARN_SECONDS:
        return f"{v:.1f}"
    if key == SPEEDUP:
        return f"{v:.2f}x"
    if key in (KL_SYM, JSD):
        return f"{v:.5f}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table_rows(runs: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "method"] + [title for _, title in COLUMNS]
    rows = [[name, str(m.get("method", "-"))] + [_fmt(m.get(k), k) for k, _ in COLUMNS] for name, m in runs]
    return header, rows


def render_table(runs: list[tuple[str, dict]], markdown: bool = False) -> str:
    """The comparison table of METHODS §5: one row per unlearning run directory's metrics."""
    header, rows = table_rows(runs)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [header] + rows)
