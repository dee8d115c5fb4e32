"""Shared test helpers (importable from the tests: pytest puts tests/ on sys.path)."""

import socket

import torch


def loss_and_grads(model, images, tokens):
    """Plain single-process CLIP loss and every parameter's gradient (a reference for wrapped/parallel runs)."""
    img, txt, scale = model(images, tokens)
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for MASTER_PORT of spawned gloo ranks, test servers, ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
