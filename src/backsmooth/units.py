"""Units shared by evaluation and reports; free of torch, so a report can format them without loading it."""


def eps_text(eps: float) -> str:
    """RobustBench's eps string: '8/255' when eps is a multiple of 1/255, else the decimal."""
    k = eps * 255
    return f"{round(k)}/255" if round(k) > 0 and abs(k - round(k)) < 1e-6 else f"{eps:g}"


NORM_TEXT = {"linf": "Linf", "l2": "L2", "l1": "L1"}  # our norm names -> AutoAttack's and RobustBench's


def threat_model_text(norm: str, eps: float) -> str:
    """'Linf, eps 8/255' or 'L2, eps 0.5': the threat model as every table states it."""
    return f"{NORM_TEXT.get(norm, norm)}, eps {eps_text(eps) if norm == 'linf' else f'{eps:g}'}"
