"""Units shared by evaluation and reports; free of torch, so a report can format them without loading it."""


def eps_text(eps: float) -> str:
    """RobustBench's eps string: '8/255' when eps is a multiple of 1/255, else the decimal."""
    k = eps * 255
    return f"{round(k)}/255" if round(k) > 0 and abs(k - round(k)) < 1e-6 else f"{eps:g}"
