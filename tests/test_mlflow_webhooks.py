"""MLflow webhook deliveries: signatures and the event mapping, checked against MLflow's own sender.

Deliveries are produced by `mlflow.webhooks.delivery._send_webhook_request` (what an MLflow server
runs), captured before they leave the process, so a change in how MLflow signs or shapes them fails here.
"""

from __future__ import annotations

import logging

import pytest
from mlflow.entities.webhook import Webhook, WebhookEvent
from mlflow.webhooks.delivery import _send_webhook_request
from mlflow.webhooks.types import ModelVersionAliasCreatedPayload, ModelVersionCreatedPayload
from pydantic import SecretStr
from starlette.testclient import TestClient

from oppen.events import MODEL_PROMOTED, MODEL_REGISTERED, model_event_id
from oppen.mlflow_webhook_receiver import ReceiverError, create_app, load_secret
from oppen.mlflow_webhooks import (
    DELIVERY_ID_HEADER,
    MAX_AGE_SECONDS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    MalformedPayload,
    SignatureError,
    StaleDelivery,
    events_for,
    verify_signature,
)
from oppen.settings import OppenSettings

SECRET = "s3cret-for-tests-0123456789"
UI = "http://mlflow.example:5000"


class Recorder:
    """Stands in for MLflow's requests session: keeps what MLflow would have posted."""

    def post(self, url, data, headers, timeout):
        self.url, self.body, self.headers = url, data, headers


@pytest.fixture
def deliver(monkeypatch):
    """deliver(event, data, secret) -> (headers, body) exactly as MLflow's server would send them."""
    # MLflow refuses plain http and loopback targets unless told otherwise (validated before sending).
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")

    def send(event: str, data: dict, secret: str = SECRET) -> tuple[dict[str, str], bytes]:
        webhook_event = WebhookEvent.from_str(event)
        hook = Webhook("hook-id", "oppen", "http://127.0.0.1:8765/mlflow-webhook", [webhook_event], 0, 0,
                       secret=secret)
        session = Recorder()
        _send_webhook_request(hook, data, webhook_event, session)
        return session.headers, session.body

    return send


def check(headers: dict[str, str], body: bytes, secret: str = SECRET, skew: float = 0) -> None:
    verify_signature(secret, headers.get(DELIVERY_ID_HEADER), headers.get(TIMESTAMP_HEADER), body,
                     headers.get(SIGNATURE_HEADER), now=lambda: int(headers[TIMESTAMP_HEADER]) + skew)


def test_a_delivery_signed_by_mlflow_is_accepted(deliver):
    check(*deliver("model_version.created", ModelVersionCreatedPayload.example()))


def test_a_tampered_body_is_refused(deliver):
    headers, body = deliver("model_version_alias.created", ModelVersionAliasCreatedPayload.example())
    with pytest.raises(SignatureError, match="does not match"):
        check(headers, body.replace(b'"alias": "example_alias"', b'"alias": "production"'))


def test_a_delivery_signed_with_another_secret_is_refused(deliver):
    headers, body = deliver("model_version.created", ModelVersionCreatedPayload.example(), secret="not-" + SECRET)
    with pytest.raises(SignatureError, match="does not match"):
        check(headers, body)


def test_a_replayed_timestamp_does_not_pass_for_another(deliver):
    headers, body = deliver("model_version.created", ModelVersionCreatedPayload.example())
    moved = headers | {TIMESTAMP_HEADER: str(int(headers[TIMESTAMP_HEADER]) + 60)}
    with pytest.raises(SignatureError):
        check(moved, body, skew=-60)


@pytest.mark.parametrize("skew", [MAX_AGE_SECONDS + 1, -(MAX_AGE_SECONDS + 1)])
def test_a_delivery_outside_the_window_is_stale(deliver, skew):
    headers, body = deliver("model_version.created", ModelVersionCreatedPayload.example())
    with pytest.raises(StaleDelivery, match=f"{MAX_AGE_SECONDS} s window"):
        check(headers, body, skew=skew)


def test_a_delivery_at_the_edge_of_the_window_is_accepted(deliver):
    check(*deliver("model_version.created", ModelVersionCreatedPayload.example()), skew=MAX_AGE_SECONDS)


@pytest.mark.parametrize("header", [SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_ID_HEADER])
def test_a_missing_header_is_named(deliver, header):
    headers, body = deliver("model_version.created", ModelVersionCreatedPayload.example())
    del headers[header]
    with pytest.raises(SignatureError, match=f"lacks {header}"):
        check(headers, body)


@pytest.mark.parametrize("value", ["v2,abc=", "abc=", "v1,", "v1"])
def test_a_malformed_signature_header_is_refused(deliver, value):
    headers, body = deliver("model_version.created", ModelVersionCreatedPayload.example())
    with pytest.raises(SignatureError, match="not of the form"):
        check(headers | {SIGNATURE_HEADER: value}, body)


def test_a_signed_but_non_numeric_timestamp_is_stale():
    import base64
    import hashlib
    import hmac

    body = b"{}"
    signature = base64.b64encode(hmac.new(SECRET.encode(), b"d.soon.{}", hashlib.sha256).digest()).decode()
    with pytest.raises(StaleDelivery, match="not a Unix time"):
        verify_signature(SECRET, "d", "soon", body, f"v1,{signature}")


def envelope(entity: str, action: str, data: dict) -> dict:
    return {"entity": entity, "action": action, "timestamp": "2026-11-23T10:00:00+00:00", "data": data}


def test_a_new_version_is_oppen_model_registered_without_an_alias():
    data = {"name": "mnist-cnn", "version": "3", "source": "models:/m-1", "run_id": "abc", "tags": {},
            "description": None}
    [spec] = events_for(envelope("model_version", "created", data), UI)
    assert spec.event == MODEL_REGISTERED
    assert spec.resource == {"prefect.resource.id": "oppen.model.mnist-cnn", "prefect.resource.name": "mnist-cnn",
                             "oppen.model.name": "mnist-cnn", "oppen.model.version": "3"}
    assert spec.payload == {"name": "mnist-cnn", "version": 3, "alias": None, "run_id": "abc",
                            "source": "mlflow-webhook", "links": {"mlflow": f"{UI}/#/models/mnist-cnn/versions/3"}}
    assert spec.related == [{"prefect.resource.id": "mlflow.run.abc", "prefect.resource.role": "mlflow-run"}]
    # The id the training flow computes for the same registration (an int version there): Prefect keeps one.
    assert spec.id == model_event_id(MODEL_REGISTERED, "mnist-cnn", 3, None)


def test_an_alias_is_oppen_model_promoted_labelled_with_it():
    [spec] = events_for(envelope("model_version_alias", "created",
                                 {"name": "team/a b", "alias": "development", "version": "7"}))
    assert spec.event == MODEL_PROMOTED
    assert spec.resource["oppen.model.alias"] == "development"
    assert spec.resource["oppen.model.version"] == "7"
    assert spec.payload == {"name": "team/a b", "version": 7, "alias": "development", "replaced_version": None,
                            "source": "mlflow-webhook", "links": {}}
    assert spec.id == model_event_id(MODEL_PROMOTED, "team/a b", 7, "development")
    assert spec.id != model_event_id(MODEL_PROMOTED, "team/a b", 7, "staging")


def test_the_ui_link_escapes_the_model_name():
    data = {"name": "team/a b", "alias": "staging", "version": "7"}
    [spec] = events_for(envelope("model_version_alias", "created", data), UI + "/")
    assert spec.payload["links"]["mlflow"] == f"{UI}/#/models/team%2Fa%20b/versions/7"


@pytest.mark.parametrize("entity,action", [("registered_model", "created"), ("model_version_alias", "deleted"),
                                           ("model_version_tag", "set"), ("prompt", "created")])
def test_other_registry_events_map_to_none(entity, action):
    assert events_for(envelope(entity, action, {"name": "m"})) == []


@pytest.mark.parametrize("payload,message", [
    ({"entity": "model_version", "action": "created"}, "not an MLflow webhook payload: timestamp: field required"),
    (envelope("model_version", "created", {"name": "m"}), "model_version.created data: version: field required"),
    (envelope("model_version_alias", "created", {"name": "m", "version": "1"}), "alias: field required"),
    ([1, 2], "not an MLflow webhook payload"),
])
def test_a_malformed_payload_is_one_sentence(payload, message):
    with pytest.raises(MalformedPayload, match=message):
        events_for(payload)


def test_mlflow_example_payloads_map(deliver):
    import json

    for event, example in [("model_version.created", ModelVersionCreatedPayload.example()),
                           ("model_version_alias.created", ModelVersionAliasCreatedPayload.example())]:
        _, body = deliver(event, example)
        [spec] = events_for(json.loads(body))
        assert spec.payload["name"] == "example_model" and spec.payload["version"] == 1


class FakePrefect:
    def __init__(self, error: Exception | None = None) -> None:
        self.emitted, self.error = [], error

    async def __call__(self, specs) -> None:
        if self.error:
            raise self.error
        self.emitted.extend(specs)


def post(prefect: FakePrefect, headers: dict[str, str], body: bytes, skew: float = 0):
    app = create_app(SecretStr(SECRET), UI, emit=prefect, now=lambda: int(headers.get(TIMESTAMP_HEADER, 0)) + skew)
    with TestClient(app) as client:
        return client.post("/mlflow-webhook", content=body, headers=headers)


def test_the_receiver_answers_200_once_the_event_is_handed_over(deliver, caplog):
    caplog.set_level(logging.DEBUG)
    prefect = FakePrefect()
    headers, body = deliver("model_version_alias.created", {"name": "m", "alias": "development", "version": "2"})
    response = post(prefect, headers, body)
    assert response.status_code == 200
    [spec] = prefect.emitted
    assert response.json() == {"events": [{"event": MODEL_PROMOTED, "id": str(spec.id)}]}
    assert SECRET not in caplog.text and headers[SIGNATURE_HEADER] not in caplog.text


@pytest.mark.parametrize("signature,error", [
    ("v1,AAAA", "the delivery's signature does not match the shared secret"),
    (None, f"the delivery lacks {SIGNATURE_HEADER}"),
])
def test_a_bad_or_missing_signature_is_401_and_emits_nothing(deliver, caplog, signature, error):
    prefect = FakePrefect()
    headers, body = deliver("model_version.created", ModelVersionCreatedPayload.example())
    headers = {k: v for k, v in (headers | {SIGNATURE_HEADER: signature}).items() if v is not None}
    response = post(prefect, headers, body)
    assert response.status_code == 401 and response.json() == {"error": error} and prefect.emitted == []
    assert SECRET not in caplog.text


def test_a_stale_delivery_is_400(deliver):
    prefect = FakePrefect()
    response = post(prefect, *deliver("model_version.created", ModelVersionCreatedPayload.example()),
                    skew=MAX_AGE_SECONDS + 5)
    assert response.status_code == 400 and prefect.emitted == []


def test_a_signed_body_that_is_not_json_is_400(deliver):
    from mlflow.webhooks.delivery import _generate_hmac_signature

    headers = {DELIVERY_ID_HEADER: "d1", TIMESTAMP_HEADER: "1000",
               SIGNATURE_HEADER: _generate_hmac_signature(SECRET, "d1", "1000", "not json")}
    response = post(FakePrefect(), headers, b"not json")
    assert response.status_code == 400 and response.json() == {"error": "the body is not JSON"}


def test_an_unmapped_event_is_acknowledged(deliver):
    prefect = FakePrefect()
    response = post(prefect, *deliver("registered_model.created", {"name": "m", "tags": {}, "description": None}))
    assert response.status_code == 200 and response.json() == {"events": []} and prefect.emitted == []


def test_prefect_unreachable_is_503_so_mlflow_retries(deliver):
    headers, body = deliver("model_version.created", ModelVersionCreatedPayload.example())
    response = post(FakePrefect(OSError("connection refused")), headers, body)
    assert response.status_code == 503
    assert response.json() == {"error": "Prefect could not be reached (OSError: connection refused)"}


def test_prefect_down_is_503_through_the_real_events_client(deliver):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from oppen.local_stack import free_port

    headers, body = deliver("model_version.created", ModelVersionCreatedPayload.example())
    app = create_app(SecretStr(SECRET), None, now=lambda: int(headers[TIMESTAMP_HEADER]))
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}), TestClient(app) as client:
        response = client.post("/mlflow-webhook", content=body, headers=headers)
    assert response.status_code == 503 and response.json()["error"].startswith("Prefect could not be reached")


def test_healthz():
    with TestClient(create_app(SecretStr(SECRET), None, emit=FakePrefect())) as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def test_a_short_secret_is_refused_in_one_sentence():
    with pytest.raises(ReceiverError, match="at least 16 characters"):
        load_secret(OppenSettings(mlflow_webhook_secret="short"))


def test_the_setting_is_the_secret_when_set():
    assert load_secret(OppenSettings(mlflow_webhook_secret=SECRET)).get_secret_value() == SECRET


def test_no_secret_and_no_prefect_is_refused_in_one_sentence(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("OPPEN_MLFLOW_WEBHOOK_SECRET", raising=False)
    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(ReceiverError, match="OPPEN_MLFLOW_WEBHOOK_SECRET is unset and PREFECT_API_URL is unset"):
            load_secret(OppenSettings())

