"""Reference implementations written with torch ops, for autograd to differentiate (shared by several test files)."""


def torch_attention(torch, kind, q, m, mask, params):
    """The same equations written with torch ops, for autograd to differentiate."""
    if kind == "dot":
        e = q @ m.transpose(1, 2)
    elif kind == "general":
        e = q @ params["W_a"] @ m.transpose(1, 2)
    else:
        z = torch.tanh((q @ params["W_q"].T)[:, :, None, :] + (m @ params["W_k"].T)[:, None, :, :])
        e = z @ params["v"]
    e = e.masked_fill(~mask[:, None, :], float("-inf"))
    a = torch.softmax(e, dim=-1)
    return a @ m, a
