package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// syncBuffer is a bytes.Buffer safe for the logger's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// fixture is a dev-certs directory with KMS identities and a signing key.
func fixture(t *testing.T) (certs, pub string) {
	t.Helper()
	pki := identitytest.New(t, identitytest.TrustDomain)
	for _, id := range []string{"spiffe://cairn.test/kms/us-east/kms-1", "spiffe://cairn.test/client/us-east/app"} {
		pki.Issue(id, devca.LeafOptions{})
	}
	dir := t.TempDir()
	_, priv, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub = filepath.Join(dir, "bundle.pub")
	if err := bundle.WriteKeys(filepath.Join(dir, "bundle.key"), pub, priv); err != nil {
		t.Fatal(err)
	}
	return pki.Dir, pub
}

func TestRunRefusesBadConfig(t *testing.T) {
	certs, pub := fixture(t)
	base := func(extra ...string) []string {
		return append([]string{"--trust-domain", "cairn.test", "--dev-certs", certs, "--state-dir", t.TempDir(),
			"--rootkms", "127.0.0.1:1", "--listen", "127.0.0.1:0"}, extra...)
	}
	tests := []struct {
		name     string
		args     []string
		code     int
		contains string
	}{
		{"unknown flag", []string{"--bogus"}, 2, "flag provided but not defined"},
		{"positional argument", []string{"--region", "us-east", "extra"}, 2, "unexpected arguments"},
		{"nothing", nil, 1, "--region, --state-dir, --rootkms and --signing-key are required"},
		{"no signing key", base("--region", "us-east", "--name", "kms/us-east/kms-1"), 1, "are required"},
		{"missing signing key file", base("--region", "us-east", "--name", "kms/us-east/kms-1", "--signing-key", "/nonexistent.pem"), 1, "--signing-key"},
		{"signing key of the wrong kind", base("--region", "us-east", "--name", "kms/us-east/kms-1", "--signing-key", filepath.Join(certs, "ca.pem")), 1, "is not a Cairn bundle public key"},
		{"no trust domain", []string{"--region", "us-east", "--state-dir", t.TempDir(), "--rootkms", "x:1", "--signing-key", pub}, 1, "--trust-domain"},
		{"identity of another tier", base("--region", "us-east", "--name", "client/us-east/app", "--signing-key", pub), 1, "want kms/us-east/<name>"},
		{"identity of another region", base("--region", "eu-west", "--name", "kms/us-east/kms-1", "--signing-key", pub), 1, "want kms/eu-west/<name>"},
		{"bad admins pattern", base("--region", "us-east", "--name", "kms/us-east/kms-1", "--signing-key", pub, "--admins", "regionctl/x*/y"), 1, "--admins"},
		{"--admins and --admins-file", base("--region", "us-east", "--name", "kms/us-east/kms-1", "--signing-key", pub, "--admins", "regionctl/*/*", "--admins-file", pub), 2, "--admins and --admins-file: give one"},
		{"missing admins file", base("--region", "us-east", "--name", "kms/us-east/kms-1", "--signing-key", pub, "--admins-file", "/nonexistent"), 1, "--admins-file"},
		{"empty admins file", base("--region", "us-east", "--name", "kms/us-east/kms-1", "--signing-key", pub, "--admins-file", os.DevNull), 1, "no patterns"},
		{"negative reload interval", base("--region", "us-east", "--name", "kms/us-east/kms-1", "--signing-key", pub, "--reload-interval", "-1s"), 2, "--reload-interval"},
		{"bad listen address", base("--region", "us-east", "--name", "kms/us-east/kms-1", "--signing-key", pub, "--listen", "256.0.0.1:99999"), 2, `--listen: "256.0.0.1:99999" is not a host:port`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var errb syncBuffer
			if code := run(context.Background(), tt.args, &errb); code != tt.code || !strings.Contains(errb.String(), tt.contains) {
				t.Errorf("kms %v = %d, %q; want %d containing %q", tt.args, code, errb.String(), tt.code, tt.contains)
			}
		})
	}
}

// TestRunServesUntilCanceled starts the binary's run with an ops listener
// and JSON logs, sees it answer (alive, not ready: no bundle yet), and stops
// it.
func TestRunServesUntilCanceled(t *testing.T) {
	certs, pub := fixture(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := l.Addr().String()
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan int)
	go func() {
		done <- run(ctx, []string{"--trust-domain", "cairn.test", "--dev-certs", certs, "--name", "kms/us-east/kms-1", "--region", "us-east",
			"--state-dir", t.TempDir(), "--rootkms", "127.0.0.1:1", "--signing-key", pub, "--listen", "127.0.0.1:0", "--metrics-listen", metricsAddr, "--log-format", "json"}, &out)
	}()
	deadline := time.Now().Add(10 * time.Second)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get("http://" + metricsAddr + "/metrics")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if !strings.Contains(string(body), "cairn_kms_ready 0") {
				t.Errorf("metrics = %s, want cairn_kms_ready 0", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics never answered: %v\n%s", err, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	for path, want := range map[string]int{"/healthz": http.StatusOK, "/readyz": http.StatusServiceUnavailable} {
		resp, err := client.Get("http://" + metricsAddr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s = %d %q, want %d", path, resp.StatusCode, body, want)
		}
		if path == "/readyz" && !strings.Contains(string(body), "fetching region keys") && !strings.Contains(string(body), "no bundle") {
			t.Errorf("GET /readyz = %q, want the reason it is not ready", body)
		}
	}
	client.CloseIdleConnections()
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("run after cancel = %d, want 0\n%s", code, out.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) < 2 {
		t.Fatalf("logged %q, want several lines", out.String())
	}
	for _, line := range lines {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil || rec["msg"] == nil {
			t.Errorf("--log-format json logged a line that is not a JSON record: %q", line)
		}
	}
}
