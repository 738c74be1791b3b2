package main

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestRunServesTransit starts run with --transit-listen and a mount, calls
// sys/health and the mount over mTLS as a client of the trust domain (not
// ready: no bundle yet), and stops it: run returns 0.
func TestRunServesTransit(t *testing.T) {
	certs, pub := fixture(t)
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan int)
	go func() {
		done <- run(ctx, []string{"--trust-domain", "cairn.test", "--dev-certs", certs, "--name", "kms/us-east/kms-1", "--region", "us-east",
			"--state-dir", t.TempDir(), "--rootkms", "127.0.0.1:1", "--signing-key", pub, "--listen", "127.0.0.1:0",
			"--transit-listen", addr, "--transit-mount", "kv/transit"}, &out)
	}()
	f := identity.Flags{TrustDomain: "cairn.test", DevCerts: certs, Name: "client/us-east/app"}
	src, err := f.Source(nil)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: identity.ClientTLSConfig(src, identity.MemberOf(src.TrustDomain()))}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	var resp *http.Response
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if resp, err = client.Get("https://" + addr + "/v1/sys/health"); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("transit sys/health never answered: %v\n%s", err, out.String())
	}
	var h struct{ Initialized, Sealed bool }
	err = json.NewDecoder(resp.Body).Decode(&h)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusServiceUnavailable || !h.Sealed || !h.Initialized {
		t.Errorf("sys/health before any bundle = %d %+v (%v), want 503 initialized and sealed", resp.StatusCode, h, err)
	}
	resp, err = client.Post("https://"+addr+"/v1/kv/transit/encrypt/payments/ledger", "application/json", strings.NewReader(`{"plaintext":"eA=="}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("X-Request-Id") == "" {
		t.Errorf("encrypt under the mount before any bundle = %d (X-Request-Id %q), want 503 with a request ID", resp.StatusCode, resp.Header.Get("X-Request-Id"))
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("run = %d after cancel, want 0\n%s", code, out.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("run did not return after cancel")
	}
	if !strings.Contains(out.String(), "Vault transit API") {
		t.Errorf("the log does not show the transit listener:\n%s", out.String())
	}
}

func TestRunRefusesBadTransitFlags(t *testing.T) {
	certs, pub := fixture(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, tc := range []struct {
		name     string
		extra    []string
		contains string
	}{
		{"bad mount", []string{"--transit-listen", freeAddr(t), "--transit-mount", "../x"}, "--transit-mount"},
		{"address in use", []string{"--transit-listen", busy.Addr().String()}, "--transit-listen"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var errb syncBuffer
			args := append([]string{"--trust-domain", "cairn.test", "--dev-certs", certs, "--name", "kms/us-east/kms-1", "--region", "us-east",
				"--state-dir", t.TempDir(), "--rootkms", "127.0.0.1:1", "--signing-key", pub, "--listen", "127.0.0.1:0"}, tc.extra...)
			if code := run(context.Background(), args, &errb); code != 1 || !strings.Contains(errb.String(), tc.contains) {
				t.Errorf("kms %v = %d, %q; want 1 containing %q", tc.extra, code, errb.String(), tc.contains)
			}
		})
	}
}
