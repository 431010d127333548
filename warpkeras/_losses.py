"""What a Keras loss is: its name and whether it takes logits (used to pick metrics and
likelihoods)."""


def loss_settings(loss):
    """``(name, from_logits)`` of a Keras loss object, loss function or `functools.partial`.

    Args:
        loss: a `keras.losses.Loss`, a loss function, or a `functools.partial` of one.

    Returns:
        ``(name, from_logits)``: the loss's name (``str``, ``""`` when it has none) and
        whether it was configured with ``from_logits=True`` (``bool``). Raises nothing.
    """
    fn = getattr(loss, "fn", None) or getattr(loss, "func", None) or loss
    name = str(getattr(loss, "name", None) or getattr(fn, "__name__", "") or "")
    kwargs = dict(getattr(loss, "keywords", None) or {})
    kwargs.update(getattr(loss, "_fn_kwargs", None) or {})
    from_logits = bool(getattr(loss, "from_logits", kwargs.get("from_logits", False)))
    return name, from_logits
