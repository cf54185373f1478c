"""TLS and mutual TLS on the gRPC port, with certificates made here (the `cryptography`
package): a CA, a server certificate for localhost and 127.0.0.1, client certificates
from that CA, from another CA, and expired. Bad server files stop start-up with a
message naming the option and the file."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eventbus.apikeys import AuthOptions, hash_secret
from inference.api.options import ServerOptions
from inference.api.server import InferenceServer
from inference.edge.tls import TlsError, TlsOptions, load
from protos import llm_pb2, llm_pb2_grpc

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: bytes | None = None) -> bytes:
        enc = (serialization.BestAvailableEncryption(password) if password
               else serialization.NoEncryption())
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def issue(cn: str, issuer: Issued | None = None, *, ca: bool = False, server: bool = False,
          not_before: dt.datetime = NOW - DAY, not_after: dt.datetime = NOW + 30 * DAY) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.cert.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        import ipaddress
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = b.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


@dataclass
class Pki:
    dir: Path
    ca: Issued
    other_ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA
    expired_client: Issued

    def write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = issue("vigil test CA", ca=True), issue("someone else's CA", ca=True)
    p = Pki(d, ca, other, issue("localhost", ca, server=True), issue("client-a", ca), issue("stranger", other),
            issue("old-client", ca, not_before=NOW - 30 * DAY, not_after=NOW - DAY))
    p.write("ca.pem", ca.cert_pem)
    p.write("server.pem", p.server.cert_pem)
    p.write("server.key", p.server.key_pem())
    return p


def server_tls(pki: Pki, **kw) -> TlsOptions:
    return TlsOptions(cert_file=str(pki.dir / "server.pem"), key_file=str(pki.dir / "server.key"), **kw)


@pytest.fixture(scope="module")
def tls_server(start_server, tiny_llama, pki):
    """TLS without client certificates."""
    return start_server(model=str(tiny_llama), model_name="tiny", quantize="none", tls=server_tls(pki))


@pytest.fixture(scope="module")
def mtls_server(start_server, tiny_llama, pki, tmp_path_factory):
    """Mutual TLS required, and API keys on top."""
    keys = tmp_path_factory.mktemp("mtls-keys") / "keys.yml"
    keys.write_text(f"- name: a\n  tenant: t\n  sha256: {hash_secret('tls-key-secret-0001')}\n")
    return start_server(model=str(tiny_llama), model_name="tiny", quantize="none",
                        tls=server_tls(pki, client_ca_file=str(pki.dir / "ca.pem")),
                        auth=AuthOptions(keys_file=str(keys)))


def channel(address: str, pki: Pki, client: Issued | None = None, root: Issued | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(root or pki.ca).cert_pem,
        private_key=client.key_pem() if client else None,
        certificate_chain=client.cert_pem if client else None)
    return grpc.secure_channel(address.replace("127.0.0.1", "localhost"), creds)


def generate(ch: grpc.Channel, metadata=None) -> llm_pb2.GenerateResponse:
    return llm_pb2_grpc.LLMStub(ch).Generate(
        llm_pb2.GenerateRequest(model="tiny", prompt="hello", sampling=llm_pb2.SamplingParams(max_tokens=2)),
        timeout=30, metadata=metadata)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    return info.value


# -- connections -----------------------------------------------------------------------


def test_tls_serves(tls_server, pki):
    with channel(tls_server.address, pki) as ch:
        assert generate(ch).completion_tokens == 2
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_refuses_plaintext_and_an_untrusted_server(tls_server, pki):
    with grpc.insecure_channel(tls_server.address) as ch:
        refused(lambda: generate(ch))
    with channel(tls_server.address, pki, root=pki.other_ca) as ch:  # the client does not trust the server
        refused(lambda: generate(ch))


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_server, pki):
    key = [("authorization", "Bearer tls-key-secret-0001")]
    with channel(mtls_server.address, pki, client=pki.client) as ch:
        assert generate(ch, key).completion_tokens == 2
        with pytest.raises(grpc.RpcError) as info:  # TLS is not a substitute for the key
            generate(ch)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with channel(mtls_server.address, pki) as ch:  # no client certificate
        refused(lambda: generate(ch, key))
        refused(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10))
    with channel(mtls_server.address, pki, client=pki.stranger) as ch:
        refused(lambda: generate(ch, key))
    with channel(mtls_server.address, pki, client=pki.expired_client) as ch:
        refused(lambda: generate(ch, key))
    with channel(mtls_server.address, pki, client=pki.client) as ch:  # still serving after the refusals
        assert generate(ch, key).completion_tokens == 2


def test_tritonclient_over_mutual_tls_with_a_key(mtls_server, pki):
    import numpy as np
    import tritonclient.grpc as tc

    client_cert, client_key = pki.write("client.pem", pki.client.cert_pem), pki.write("client.key", pki.client.key_pem())
    client = tc.InferenceServerClient(mtls_server.address, ssl=True, root_certificates=str(pki.dir / "ca.pem"),
                                      private_key=client_key, certificate_chain=client_cert)
    try:
        text = tc.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
        result = client.infer("tiny", [text], headers={"authorization": "Bearer tls-key-secret-0001"})
        assert result.as_numpy("text_output") is not None
        assert client.is_server_live()
    finally:
        client.close()


# -- start-up errors -------------------------------------------------------------------


def bad(pki: Pki, **files) -> str:
    """The TlsError message for server options with some files replaced."""
    o = server_tls(pki)
    for name, value in files.items():
        setattr(o, name, value)
    with pytest.raises(TlsError) as info:
        load(o)
    return str(info.value)


def test_unreadable_and_malformed_files(pki):
    assert bad(pki, cert_file=str(pki.dir / "missing.pem")).startswith(f"--tls-cert {pki.dir / 'missing.pem'}: cannot read")
    junk = pki.write("junk.pem", b"not a certificate\n")
    assert bad(pki, cert_file=junk).startswith(f"--tls-cert {junk}: ")
    assert bad(pki, key_file=junk).startswith(f"--tls-key {junk}: not a PEM private key")
    assert "--tls-key: missing" in bad(pki, key_file="")
    assert "--tls-cert: missing" in bad(pki, cert_file="", client_ca_file=str(pki.dir / "ca.pem"))


def test_key_that_is_not_the_certificates(pki):
    other = pki.write("other.key", pki.client.key_pem())
    assert "is not the private key of the certificate" in bad(pki, key_file=other)


def test_encrypted_key_is_refused_with_the_fix(pki):
    enc = pki.write("enc.key", pki.server.key_pem(b"hunter22"))
    assert "encrypted" in bad(pki, key_file=enc)


def test_expired_and_not_yet_valid_server_certificates(pki):
    old = issue("localhost", pki.ca, server=True, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    cert, key = pki.write("old.pem", old.cert_pem), pki.write("old.key", old.key_pem())
    message = bad(pki, cert_file=cert, key_file=key)
    assert message.startswith(f"--tls-cert {cert}: certificate CN=localhost expired at ")
    future = issue("localhost", pki.ca, server=True, not_before=NOW + DAY, not_after=NOW + 10 * DAY)
    cert, key = pki.write("future.pem", future.cert_pem), pki.write("future.key", future.key_pem())
    assert "is not valid before" in bad(pki, cert_file=cert, key_file=key)


def test_client_ca_checks(pki):
    junk = pki.write("junk-ca.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert bad(pki, client_ca_file=junk).startswith(f"--tls-client-ca {junk}: not a PEM certificate")


async def test_server_refuses_to_start_on_a_bad_file_before_loading_the_model(pki):
    expired = issue("localhost", pki.ca, server=True, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    o = ServerOptions(model="/nonexistent/model", port=0, metrics_port=-1,
                      tls=TlsOptions(cert_file=pki.write("x.pem", expired.cert_pem),
                                     key_file=pki.write("x.key", expired.key_pem())))
    with pytest.raises(TlsError, match="expired"):
        await InferenceServer(o).start()


def test_cli_reports_a_bad_certificate(pki, capsys):
    from vigil.cli import main

    mismatched = pki.write("mismatch.key", pki.client.key_pem())
    rc = main(["serve", "--model", "/nonexistent/model", "--port", "0", "--metrics-port", "-1",
               "--tls-cert", str(pki.dir / "server.pem"), "--tls-key", mismatched])
    assert rc == 2
    assert "vigil serve: --tls-key" in capsys.readouterr().err
