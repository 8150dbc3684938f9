"""meshd's certificate authority and the checks an X.509-SVID must pass, with real keys and
certificates (the clock is the only stand-in)."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from libmesh.identity import (
    SpiffeId,
    SpiffeIdError,
    SvidError,
    make_csr,
    new_private_key,
    verify_svid,
)
from meshd._ca import CAError, CertificateAuthority

NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)
REVIEWS = SpiffeId.for_workload("cluster.local", "shop", "reviews")
RATINGS = SpiffeId.for_workload("cluster.local", "shop", "ratings")


def clock() -> datetime.datetime:
    return NOW


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", clock=clock)


def csr_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, identity: SpiffeId) -> bytes:
    return make_csr(key, identity).public_bytes(serialization.Encoding.PEM)


def chain_of(pems: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


# -- SPIFFE IDs -----------------------------------------------------------------------------------


def test_spiffe_ids_parse_and_name_istios_parts() -> None:
    identity = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/reviews")
    assert identity == REVIEWS
    assert (identity.namespace, identity.service_account) == ("shop", "reviews")
    assert str(identity) == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert SpiffeId.parse("spiffe://example.org").path == ""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("https://cluster.local/ns/a/sa/b", "must start with spiffe://"),
        ("spiffe:///ns/a", "no trust domain"),
        ("spiffe://Cluster.Local/ns/a", "lower-case"),
        ("spiffe://td/ns//sa/b", "empty path segment"),
        ("spiffe://td/ns/a/", "empty path segment"),
        ("spiffe://td/ns/../sa", "'.' or '..'"),
        ("spiffe://td/ns/a?x=1", "no query"),
        ("spiffe://td/ns/a b", "may hold only"),
    ],
)
def test_what_is_not_a_spiffe_id_is_refused_with_the_rule(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError, match=reason.replace("?", r"\?").replace(".", r"\.")):
        SpiffeId.parse(text)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("spiffe://cluster.local/ns/shop/sa/reviews", "reviews.shop.spiffe.cluster.local"),
        ("spiffe://example.org/ns/shop/sa/web-1", "web-1.shop.spiffe.example.org"),
        # not one lower-case label each: "a.b" in "ns" and "a" in "b.ns" would share a name
        ("spiffe://cluster.local/ns/ns/sa/a.b", None),
        ("spiffe://cluster.local/ns/b.ns/sa/a", None),
        ("spiffe://cluster.local/ns/Shop/sa/web", None),  # would be shop/web's
        ("spiffe://cluster.local/ns/shop/sa/under_score", None),  # not a host name
        ("spiffe://cluster.local/workload/reviews", None),  # not Istio-shaped
        ("spiffe://cluster.local/ns/shop/sa/" + "x" * 64, None),  # a label is at most 63
    ],
)
def test_an_istio_shaped_id_has_a_dns_form_for_clients_that_check_host_names(
    text: str, name: str | None
) -> None:
    assert SpiffeId.parse(text).dns_name == name


# -- the CA --------------------------------------------------------------------------------------


def test_the_root_is_made_once_and_its_key_file_is_0600(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "ca", clock=clock)
    key_file = tmp_path / "ca" / "root-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = CertificateAuthority.load_or_create(tmp_path / "ca", clock=clock)
    assert again.bundle_pem() == first.bundle_pem()


def test_a_readable_ca_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path / "ca", clock=clock)
    (tmp_path / "ca" / "root-key.pem").chmod(0o644)
    with pytest.raises(CAError, match=r"readable by its owner only \(mode 644\); run: chmod 600"):
        CertificateAuthority.load_or_create(tmp_path / "ca", clock=clock)


def test_a_signed_svid_follows_the_x509_svid_standard(ca: CertificateAuthority) -> None:
    key = new_private_key()
    chain = chain_of(ca.sign(csr_pem(key, REVIEWS), REVIEWS))

    leaf = chain[0]
    assert len(chain) == 2  # leaf, root
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(REVIEWS)]
    assert list(san.value) == [
        x509.UniformResourceIdentifier(str(REVIEWS)),
        # its DNS form, for clients that check host names only (grpcio's TLS credentials)
        x509.DNSName("reviews.shop.spiffe.cluster.local"),
    ]
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_encipherment  # an ECDSA key
    assert not usage.key_cert_sign
    assert leaf.not_valid_after_utc - NOW == datetime.timedelta(hours=24)  # the default TTL
    assert verify_svid(chain, ca.roots, now=NOW, trust_domain="cluster.local") == REVIEWS


def test_an_rsa_key_gets_key_encipherment_too(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (leaf, _) = chain_of(ca.sign(csr_pem(key, REVIEWS), REVIEWS))
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment


def test_the_lifetime_is_capped(ca: CertificateAuthority) -> None:
    key = new_private_key()
    leaf = chain_of(ca.sign(csr_pem(key, REVIEWS), REVIEWS, datetime.timedelta(days=400)))[0]
    assert leaf.not_valid_after_utc - NOW == datetime.timedelta(days=90)


def test_a_csr_for_another_identity_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CAError, match=r"asks for spiffe://cluster\.local/ns/shop/sa/ratings"):
        ca.sign(csr_pem(new_private_key(), RATINGS), REVIEWS)


def test_a_csr_with_extra_names_is_refused(ca: CertificateAuthority) -> None:
    key = new_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(REVIEWS)), x509.DNSName("evil.example")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CAError, match="it may ask only for"):
        ca.sign(csr.public_bytes(serialization.Encoding.PEM), REVIEWS)


def test_an_altered_csr_or_garbage_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CAError, match="not a PEM certificate signing request"):
        ca.sign(b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n", REVIEWS)
    with pytest.raises(CAError, match="trust domain"):
        ca.sign(csr_pem(new_private_key(), REVIEWS), SpiffeId.parse("spiffe://other.org/x"))


def test_a_plugged_in_intermediate_signs_and_the_chain_reaches_the_root(tmp_path: Path) -> None:
    root = CertificateAuthority.load_or_create(tmp_path / "root", clock=clock)
    # an intermediate the operator made with its own root
    intermediate_key = new_private_key()
    root_key = serialization.load_pem_private_key(
        (tmp_path / "root" / "root-key.pem").read_bytes(), password=None
    )
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.roots[0].subject)
        .public_key(intermediate_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    (tmp_path / "int-cert.pem").write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    key_path = tmp_path / "int-key.pem"
    key_path.write_bytes(
        intermediate_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    (tmp_path / "chain.pem").write_bytes((tmp_path / "root" / "root-cert.pem").read_bytes())
    ca = CertificateAuthority.plug_in(
        tmp_path / "int-cert.pem", key_path, tmp_path / "chain.pem", clock=clock
    )

    chain = chain_of(ca.sign(csr_pem(new_private_key(), REVIEWS), REVIEWS))

    assert len(chain) == 3  # leaf, intermediate, root
    assert verify_svid(chain, root.roots, now=NOW) == REVIEWS


# -- what a peer's certificate must pass ---------------------------------------------------------


def test_expired_and_not_yet_valid_svids_are_refused(ca: CertificateAuthority) -> None:
    chain = chain_of(ca.sign(csr_pem(new_private_key(), REVIEWS), REVIEWS))
    with pytest.raises(SvidError, match="expired at"):
        verify_svid(chain, ca.roots, now=NOW + datetime.timedelta(days=2))
    with pytest.raises(SvidError, match="not valid before"):
        verify_svid(chain, ca.roots, now=NOW - datetime.timedelta(hours=1))


def test_a_foreign_ca_a_wrong_trust_domain_and_a_wrong_identity_are_refused(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    foreign = CertificateAuthority.load_or_create(tmp_path / "foreign", clock=clock)
    chain = chain_of(foreign.sign(csr_pem(new_private_key(), REVIEWS), REVIEWS))
    with pytest.raises(SvidError, match="not signed by the trust bundle"):
        verify_svid(chain, ca.roots, now=NOW)

    other = CertificateAuthority.load_or_create(tmp_path / "other", "other.org", clock=clock)
    elsewhere = SpiffeId.for_workload("other.org", "shop", "reviews")
    chain = chain_of(other.sign(csr_pem(new_private_key(), elsewhere), elsewhere))
    with pytest.raises(SvidError, match=r"in trust domain 'other\.org', not 'cluster\.local'"):
        verify_svid(chain, other.roots, now=NOW, trust_domain="cluster.local")

    chain = chain_of(ca.sign(csr_pem(new_private_key(), REVIEWS), REVIEWS))
    with pytest.raises(
        SvidError, match=r"not the expected spiffe://cluster\.local/ns/shop/sa/ratings"
    ):
        verify_svid(chain, ca.roots, now=NOW, expected=RATINGS)


def test_a_ca_certificate_cannot_pose_as_a_workload(ca: CertificateAuthority) -> None:
    with pytest.raises(SvidError, match="is a CA"):
        verify_svid(ca.roots, ca.roots, now=NOW)


def test_a_root_rotation_trusts_both_roots_through_the_overlap(tmp_path: Path) -> None:
    from meshd._ca import rotate_activate, rotate_finish, rotate_prepare

    ca = CertificateAuthority.load_or_create(tmp_path)
    old = ca.roots[0]
    web = SpiffeId.for_workload("cluster.local", "shop", "web")
    key = new_private_key()

    new = rotate_prepare(tmp_path)
    assert ca.refresh()
    assert ca.roots == [old, new]  # trusted before it signs
    chain = chain_of(ca.sign(csr_pem(key, web), web))
    assert chain[1:] == [old, new]  # signed by the old root; the new one rides along
    assert verify_svid(chain[:2], [old, new]) == web
    assert not ca.refresh()  # nothing changed since

    rotate_activate(tmp_path)
    assert ca.refresh()
    assert ca.roots == [new, old]
    chain = chain_of(ca.sign(csr_pem(key, web), web))
    assert verify_svid(chain[:2], [new]) == web  # the new root signs now
    assert stat.S_IMODE((tmp_path / "root-key.pem").stat().st_mode) == 0o600

    rotate_finish(tmp_path)
    assert ca.refresh()
    assert ca.roots == [new]
    with pytest.raises(CAError, match="no rotation is waiting"):
        rotate_finish(tmp_path)
