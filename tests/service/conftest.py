"""Fixtures shared by the API tests of this folder: the real openai client for a module's ``server``."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    """The served model's name, as /v1/models reports it."""
    return client.models.list().data[0].id
