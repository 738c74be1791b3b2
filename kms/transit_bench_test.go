package kms_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	"github.com/cairnkms/cairn/kms/transit"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// startTransitBench serves srv's transit API over HTTPS on loopback as the
// KMS identity, as cmd/kms does, and returns the base URL.
func (w *benchWorld) startTransitBench(b *testing.B, srv *kms.Server) string {
	b.Helper()
	h, err := srv.Transit(transit.Options{})
	if err != nil {
		b.Fatal(err)
	}
	src := w.pki.Source(kms1ID)
	hs := &http.Server{Handler: h, TLSConfig: identity.ServerTLSConfig(src, identity.MemberOf(src.TrustDomain())),
		ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}
	lis := listen(b)
	done := make(chan struct{})
	go func() { defer close(done); _ = hs.ServeTLS(lis, "", "") }()
	b.Cleanup(func() { hs.Close(); <-done })
	return "https://" + lis.Addr().String()
}

// transitClient is an HTTPS client calling as id. With h2, its calls share
// one HTTP/2 connection (as the gRPC benchmark's share one); without, they
// use HTTP/1.1 with a pooled connection per caller (as the Vault client
// would against a server without HTTP/2).
func (w *benchWorld) transitClient(b *testing.B, id string, h2 bool, callers int) *http.Client {
	b.Helper()
	src := w.pki.Source(id)
	tlsCfg := identity.ClientTLSConfig(src, identity.MemberOf(src.TrustDomain()))
	tr := &http.Transport{TLSClientConfig: tlsCfg, MaxIdleConnsPerHost: callers, IdleConnTimeout: time.Minute,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext}
	if h2 {
		tr.ForceAttemptHTTP2 = true
	} else {
		tlsCfg.NextProtos = []string{"http/1.1"}
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	b.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// BenchmarkTransit compares, in one run, the decrypt of a 32-byte DEK with
// 16 bytes of associated data over the transit HTTPS API (Vault's JSON,
// base64, "vault:v<N>:" ciphertexts; TLS 1.3 with client certificates) and
// over gRPC, against the same in-process server (AES256_GCM keyset, audit
// log on a temp file), with exactly 1, 16 and 64 concurrent callers. The
// gRPC callers share one connection; the HTTP callers share one HTTP/2
// connection (proto=h2) or a pool of HTTP/1.1 connections (proto=http1).
// Per sub-benchmark: ops/s, p50 and p99; the transit runs also report their
// throughput over gRPC's at the same concurrency (transit/grpc, paired in
// ABBA order as BenchmarkDataPlane pairs decrypt and echo; target >= 0.7).
func BenchmarkTransit(b *testing.B) {
	w := newBenchWorld(b)
	ks := kmstest.NewKeyset(b, ledger, kmstest.ACL("client/us-east/app"))
	srv, addr := startKMS(b, w.config(b, w.persist(b, ks), w.pki.Source(kms1ID), openAudit(b)))
	client := kmsv1.NewKMSClient(w.dial(b, appID, addr))
	base := w.startTransitBench(b, srv) + "/v1/transit/decrypt/" + ledger

	ctx, cancel := context.WithTimeout(b.Context(), benchDeadline)
	defer cancel()
	seals := make([]sealed, slices.Max(benchCallers))
	for i := range seals {
		dek, ad := randBytes(dekSize), randBytes(adSize)
		r, err := client.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: dek, AssociatedData: ad})
		if err != nil {
			b.Fatalf("Encrypt = %v", err)
		}
		seals[i] = sealed{dek: dek, ad: ad, ct: r.GetCiphertext()}
	}
	grpcDecrypt := func(i int) func(context.Context) error {
		s := seals[i]
		req := &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: s.ct, AssociatedData: s.ad}
		return func(ctx context.Context) error {
			r, err := client.Decrypt(ctx, req)
			if err != nil {
				return err
			}
			if !bytes.Equal(r.GetPlaintext(), s.dek) {
				return fmt.Errorf("Decrypt = %x, want %x", r.GetPlaintext(), s.dek)
			}
			return nil
		}
	}
	httpDecrypt := func(hc *http.Client) load {
		return func(i int) func(context.Context) error {
			s := seals[i]
			vct, err := transit.FormatCiphertext(s.ct)
			if err != nil {
				b.Fatal(err)
			}
			body, err := json.Marshal(map[string]string{"ciphertext": vct, "associated_data": base64.StdEncoding.EncodeToString(s.ad)})
			if err != nil {
				b.Fatal(err)
			}
			want := base64.StdEncoding.EncodeToString(s.dek)
			return func(ctx context.Context) error {
				req, err := http.NewRequestWithContext(ctx, http.MethodPost, base, bytes.NewReader(body))
				if err != nil {
					return err
				}
				resp, err := hc.Do(req)
				if err != nil {
					return err
				}
				data, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					return err
				}
				var out struct {
					Data struct {
						Plaintext string `json:"plaintext"`
					} `json:"data"`
				}
				if err := json.Unmarshal(data, &out); err != nil || resp.StatusCode != http.StatusOK || out.Data.Plaintext != want {
					return fmt.Errorf("transit decrypt = %d %s (%v), want 200 and the DEK", resp.StatusCode, data, err)
				}
				return nil
			}
		}
	}
	for _, callers := range benchCallers {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			b.Run("grpc", func(b *testing.B) { runCallers(b, callers, 1, grpcDecrypt) })
			for _, proto := range []string{"h2", "http1"} {
				l := httpDecrypt(w.transitClient(b, appID, proto == "h2", callers))
				b.Run("transit/proto="+proto, func(b *testing.B) {
					runCallers(b, callers, 1, l)
					reportPaired(b, callers, "transit/grpc", l, grpcDecrypt)
				})
			}
		})
	}
}
