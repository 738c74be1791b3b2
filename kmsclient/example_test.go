package kmsclient_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/keyset"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/kmsclient"
)

// Example_envelope encrypts an object under a fresh data key that the
// regional KMS wraps (Tink's envelope encryption), and decrypts it.
func Example_envelope() {
	kms := startExampleKMS() // in-process KMS servers of us-east, and this app's certificate files
	defer kms.Close()

	client, err := kmsclient.New(
		kmsclient.WithEndpoints("us-east", kms.Addrs...),
		kmsclient.WithIdentityFiles(kms.CertFile, kms.KeyFile, kms.BundleFile),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	kek, err := client.AEAD("us-east", "payments/ledger")
	if err != nil {
		log.Fatal(err)
	}
	env, err := aead.NewKMSEnvelopeAEADWithContext(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		log.Fatal(err)
	}

	ctx := context.Background()
	object, objectID := []byte("ledger row 42: balance 100.00"), []byte("rows/42")
	ct, err := env.EncryptWithContext(ctx, object, objectID) // one KMS call: wrap the new data key
	if err != nil {
		log.Fatal(err)
	}
	pt, err := env.DecryptWithContext(ctx, ct, objectID) // one KMS call: unwrap it
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s\n", pt)

	_, err = env.DecryptWithContext(ctx, ct, []byte("rows/43"))
	fmt.Println("decrypts as another object:", err == nil)
	// Output:
	// ledger row 42: balance 100.00
	// decrypts as another object: false
}

// Example_encryptedKeyset keeps a data keyset encrypted under the KMS, so
// that many records are encrypted locally after one KMS call.
func Example_encryptedKeyset() {
	kms := startExampleKMS()
	defer kms.Close()

	client, err := kmsclient.New(
		kmsclient.WithEndpoints("us-east", kms.Addrs...),
		kmsclient.WithIdentityFiles(kms.CertFile, kms.KeyFile, kms.BundleFile),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	kek, err := client.GetAEAD("cairn-kms://us-east/payments/ledger")
	if err != nil {
		log.Fatal(err)
	}

	// Once: make a data keyset and store it encrypted under the KMS
	// (keyset.WriteWithContext/ReadWithContext also take associated data).
	h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
	if err != nil {
		log.Fatal(err)
	}
	var stored bytes.Buffer
	if err := h.Write(keyset.NewBinaryWriter(&stored), kek); err != nil {
		log.Fatal(err)
	}

	// At start-up: one KMS call to unwrap it, then encrypt locally.
	loaded, err := keyset.Read(keyset.NewBinaryReader(&stored), kek)
	if err != nil {
		log.Fatal(err)
	}
	records, err := aead.New(loaded)
	if err != nil {
		log.Fatal(err)
	}
	ct, err := records.Encrypt([]byte("record 1"), []byte("table/records"))
	if err != nil {
		log.Fatal(err)
	}
	pt, err := records.Decrypt(ct, []byte("table/records"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s\n", pt)
	// Output: record 1
}

func ExampleParseKeyURI() {
	region, keyset, err := kmsclient.ParseKeyURI("cairn-kms://us-east/payments/ledger")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(region, keyset)
	fmt.Println(kmsclient.KeyURI(region, keyset))
	// Output:
	// us-east payments/ledger
	// cairn-kms://us-east/payments/ledger
}

// exampleKMS is what the examples run against: two KMS servers of us-east
// serving payments/ledger, and the certificate files of the app identity
// (as `cairn dev certs` lays them out: <dir>/ca.pem and
// <dir>/client/us-east/app/{cert.pem,key.pem}).
type exampleKMS struct {
	tb                            *exampleTB
	Addrs                         []string
	CertFile, KeyFile, BundleFile string
}

func startExampleKMS() *exampleKMS {
	tb := &exampleTB{}
	w := newWorld(tb)
	s1, s2 := w.startKMS(east, "kms-1"), w.startKMS(east, "kms-2")
	_, certFile, keyFile := w.pki.Issue(appID, devca.LeafOptions{})
	return &exampleKMS{tb: tb, Addrs: addrs(s1, s2), CertFile: certFile, KeyFile: keyFile, BundleFile: w.pki.BundleFile()}
}

// Close stops the servers and removes their files.
func (k *exampleKMS) Close() { k.tb.close() }

// exampleTB lets Example functions, which get no testing.TB, use the test
// world's builders (identitytest, kmstest), which take one. It implements
// the methods those builders call (Helper, Fatal, Fatalf, TempDir, Cleanup);
// the embedded interface is nil, so any other method panics and a builder
// that starts using one is noticed at once.
type exampleTB struct {
	testing.TB
	cleanups []func()
}

func (e *exampleTB) Helper()                      {}
func (e *exampleTB) Fatal(args ...any)            { panic(fmt.Sprint(args...)) }
func (e *exampleTB) Fatalf(f string, args ...any) { panic(fmt.Sprintf(f, args...)) }
func (e *exampleTB) Cleanup(f func())             { e.cleanups = append(e.cleanups, f) }

func (e *exampleTB) TempDir() string {
	dir, err := os.MkdirTemp("", "kmsclient-example-")
	if err != nil {
		panic(err)
	}
	e.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// close runs the cleanups, last first.
func (e *exampleTB) close() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
	e.cleanups = nil
}
