package keystore_test

import (
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kms/kmstest"
)

// BenchmarkBuild measures keystore.Build of a bundle of 10k AES256_GCM
// keysets (one key each): the part of a KMS boot after the bundle is
// verified (decrypt every keyset under the region key, build its Tink AEAD
// and its ACLs), spread over GOMAXPROCS workers. It reports the wall time
// per keyset.
func BenchmarkBuild(b *testing.B) {
	const n = 10_000
	keys := kmstest.NewRegionKeys()
	keys.AddVersion(b, region)
	acl := kmstest.ACL("client/us-east/app")
	kss := make([]*kmstest.Keyset, n)
	for i := range kss {
		kss[i] = kmstest.NewKeyset(b, fmt.Sprintf("t%03d/keyset-%06d", i/1000, i), acl)
	}
	bundle := kmstest.Bundle(b, keys, region, 1, kss...)
	kss = nil
	rk, err := keys.Fetch(b.Context(), region)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		s, err := keystore.Build(bundle, rk, nil, time.Now())
		if err != nil {
			b.Fatalf("Build = %v", err)
		}
		if s.Len() != n {
			b.Fatalf("Build made %d keysets, want %d", s.Len(), n)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/1e3/float64(b.N)/n, "µs/keyset")
}

// BenchmarkKeysetDecrypt measures the KMS's own share of a Decrypt call on
// one keyset from every CPU at once: the ACL check and Keyset.Decrypt of a
// 32-byte DEK with 16 bytes of associated data (prefix routing, AES-GCM,
// and the usage counters, which all callers share).
func BenchmarkKeysetDecrypt(b *testing.B) {
	keys := kmstest.NewRegionKeys()
	keys.AddVersion(b, region)
	ks := kmstest.NewKeyset(b, "payments/ledger", kmstest.ACL("client/us-east/app"))
	rk, err := keys.Fetch(b.Context(), region)
	if err != nil {
		b.Fatal(err)
	}
	s, err := keystore.Build(kmstest.Bundle(b, keys, region, 1, ks), rk, nil, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	k, _ := s.Keyset("payments/ledger")
	dek, ad := make([]byte, 32), make([]byte, 16)
	_, _ = rand.Read(dek)
	_, _ = rand.Read(ad)
	ct, _, err := k.Encrypt(dek, ad, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if !k.Allows(keystore.OpDecrypt, app) {
				b.Error("Allows = false")
				return
			}
			if _, _, err := k.Decrypt(ct, ad, time.Now()); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
