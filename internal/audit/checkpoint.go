package audit

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// SVIDSigner returns an Options.Signer that signs checkpoints with the
// X.509-SVID src holds now (an identity.Source reloads it when its files
// change), so a verifier can check a checkpoint against the trust bundle.
func SVIDSigner(src x509svid.Source) func() (crypto.Signer, []*x509.Certificate, error) {
	return func() (crypto.Signer, []*x509.Certificate, error) {
		svid, err := src.GetX509SVID()
		if err != nil {
			return nil, nil, fmt.Errorf("audit: checkpoint key: %w", err)
		}
		return svid.PrivateKey, svid.Certificates, nil
	}
}

// appendCheckpoint appends the checkpoint line for chain state st to out:
// signed now by the log's signer.
func (l *Log) appendCheckpoint(out []byte, st chainState, e entry) ([]byte, error) {
	key, certs, err := l.signer()
	if err != nil {
		return out, fmt.Errorf("checkpoint: %w", err)
	}
	if key == nil || len(certs) == 0 {
		return out, errors.New("checkpoint: the signer returned no key or no certificate")
	}
	signer, err := spiffeIDOf(certs[0])
	if err != nil {
		return out, fmt.Errorf("checkpoint: %w", err)
	}
	t := e.t.UTC()
	prev := hex.EncodeToString(st.head[:])
	sig, err := signMessage(key, CheckpointMessage(prev, st.since, t, e.final, signer))
	if err != nil {
		return out, fmt.Errorf("checkpoint: sign: %w", err)
	}
	ders := make([][]byte, len(certs))
	for i, c := range certs {
		ders[i] = c.Raw
	}
	r := Record{Time: t, Prev: prev, Identity: signer, Operation: CheckpointOperation, Outcome: OutcomeOK,
		Checkpoint: &Checkpoint{Records: st.since, Final: e.final, Signer: signer, Certs: ders, Sig: sig}}
	if err := r.validate(); err != nil {
		return out, fmt.Errorf("checkpoint: %w", err)
	}
	out, err = appendHead(out, t)
	if err != nil {
		return out, fmt.Errorf("checkpoint: %w", err)
	}
	out = appendField(out, `,"prev":`, prev)
	return appendTail(out, &r), nil
}

// spiffeIDOf returns the one URI SAN of an X.509-SVID leaf.
func spiffeIDOf(c *x509.Certificate) (string, error) {
	if len(c.URIs) != 1 {
		return "", fmt.Errorf("certificate %q has %d URI SANs, want one SPIFFE ID", c.Subject, len(c.URIs))
	}
	return c.URIs[0].String(), nil
}

// signMessage signs a checkpoint message: Ed25519 signs it whole, every
// other key its SHA-256.
func signMessage(key crypto.Signer, msg []byte) ([]byte, error) {
	if _, ok := key.Public().(ed25519.PublicKey); ok {
		return key.Sign(rand.Reader, msg, crypto.Hash(0))
	}
	d := sha256.Sum256(msg)
	return key.Sign(rand.Reader, d[:], crypto.SHA256)
}

// verifySignature checks sig over msg with pub, as signMessage made it.
func verifySignature(pub any, msg, sig []byte) error {
	d := sha256.Sum256(msg)
	switch k := pub.(type) {
	case ed25519.PublicKey:
		if !ed25519.Verify(k, msg, sig) {
			return errors.New("bad Ed25519 signature")
		}
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(k, d[:], sig) {
			return errors.New("bad ECDSA signature")
		}
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(k, crypto.SHA256, d[:], sig); err != nil {
			return fmt.Errorf("bad RSA signature: %w", err)
		}
	default:
		return fmt.Errorf("unsupported public key type %T", pub)
	}
	return nil
}
