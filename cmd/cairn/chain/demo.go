package chain

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/tink"

	"github.com/cairnkms/cairn/kmsclient"
)

// Bounds of the demo.
const (
	demoTimeout     = 60 * time.Second // the whole round trip
	demoCallTimeout = 10 * time.Second // one KMS call, retries included
)

// demoMessage is what the demo encrypts: not a secret.
var demoMessage = []byte(strings.Repeat("Cairn: trust flows down, load flows up. ", 26))

// demoAD is the demo's associated data (Tink's envelope AEAD binds it to the
// payload).
var demoAD = []byte("cairn up demo")

// runDemo does what a storage system does with Cairn, through the Tink
// client and the chain's Info: envelope-encrypt a message with a fresh data
// key wrapped by demo/notes through the first region's kms-1, decrypt it
// through that region's kms-2, and, with a second region, decrypt it there
// as that region's client (the same keyset, cross-region; see
// demoTeamFile). It prints sizes and results, never key material.
func runDemo(ctx context.Context, info Info) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, demoTimeout)
	defer cancel()
	home := info.Regions[0]
	if len(home.KMS) < 2 {
		return "", fmt.Errorf("chain: demo: region %s has %d KMS servers, want 2", home.Name, len(home.KMS))
	}
	uri := KeyURI(home.Name, notesKeyset)

	// Encrypt through kms-1 only.
	enc, closeEnc, err := demoEnvelope(home.Client, home.Name, home.KMS[0], uri)
	if err != nil {
		return "", err
	}
	defer closeEnc()
	ct, err := enc.EncryptWithContext(ctx, demoMessage, demoAD)
	if err != nil {
		return "", fmt.Errorf("chain: demo: encrypting with %s through %s: %w", uri, home.KMS[0], err)
	}
	if bytes.Contains(ct, demoMessage) {
		return "", fmt.Errorf("chain: demo: the ciphertext holds the message")
	}
	wrapped := 0
	if len(ct) >= 4 {
		wrapped = int(binary.BigEndian.Uint32(ct[:4]))
	}

	// Decrypt through kms-2 only: another server of the region.
	dec, closeDec, err := demoEnvelope(home.Client, home.Name, home.KMS[1], uri)
	if err != nil {
		return "", err
	}
	defer closeDec()
	if err := demoOpen(ctx, dec, ct, uri, home.KMS[1]); err != nil {
		return "", err
	}
	detail := fmt.Sprintf("%d-byte message -> %d-byte ciphertext (DEK wrapped by the KMS: %d bytes) through %s; decrypted through %s: matched",
		len(demoMessage), len(ct), wrapped, home.KMS[0], home.KMS[1])

	// Decrypt in another region, as that region's client.
	if len(info.Regions) > 1 {
		other := info.Regions[1]
		otherURI := KeyURI(other.Name, notesKeyset)
		x, closeX, err := demoEnvelope(other.Client, other.Name, strings.Join(other.KMS, ","), otherURI)
		if err != nil {
			return "", err
		}
		defer closeX()
		if err := demoOpen(ctx, x, ct, otherURI, other.Name); err != nil {
			return "", err
		}
		detail += fmt.Sprintf("; decrypted in %s as %s: matched", other.Name, other.Client.SPIFFEID)
	}
	return detail, nil
}

// demoEnvelope returns Tink's envelope AEAD over the Cairn keyset uri of
// region, called as id through the comma-separated addrs only.
func demoEnvelope(id Identity, region, addrs, uri string) (*aead.KMSEnvelopeAEADWithContext, func(), error) {
	client, err := kmsclient.New(
		kmsclient.WithEndpoints(region, strings.Split(addrs, ",")...),
		kmsclient.WithIdentityFiles(id.Cert, id.Key, id.CA),
		kmsclient.WithTimeout(demoCallTimeout))
	if err != nil {
		return nil, nil, fmt.Errorf("chain: demo: %w", err)
	}
	closeClient := func() { client.Close() }
	kek, err := client.GetAEAD(uri)
	if err != nil {
		closeClient()
		return nil, nil, fmt.Errorf("chain: demo: %w", err)
	}
	kekCtx, ok := kek.(tink.AEADWithContext)
	if !ok {
		closeClient()
		return nil, nil, fmt.Errorf("chain: demo: kmsclient's AEAD (%T) is not a tink.AEADWithContext", kek)
	}
	env, err := aead.NewKMSEnvelopeAEADWithContext(aead.AES256GCMKeyTemplate(), kekCtx)
	if err != nil {
		closeClient()
		return nil, nil, fmt.Errorf("chain: demo: %w", err)
	}
	return env, closeClient, nil
}

// demoOpen decrypts ct with env and checks that the message comes back.
func demoOpen(ctx context.Context, env *aead.KMSEnvelopeAEADWithContext, ct []byte, uri, where string) error {
	pt, err := env.DecryptWithContext(ctx, ct, demoAD)
	if err != nil {
		return fmt.Errorf("chain: demo: decrypting with %s through %s: %w", uri, where, err)
	}
	if !bytes.Equal(pt, demoMessage) {
		return fmt.Errorf("chain: demo: decrypting with %s through %s gave %d bytes that are not the message", uri, where, len(pt))
	}
	return nil
}
