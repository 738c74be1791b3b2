package kms_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/transit"
)

// transitServer serves s's transit API over HTTPS on loopback with the
// server's identity (identity.ServerTLSConfig, as cmd/kms does) until the
// test ends, and returns its base URL.
func (e *env) transitServer(s *server) string {
	e.t.Helper()
	h, err := s.Transit(transit.Options{})
	if err != nil {
		e.t.Fatalf("Transit = %v", err)
	}
	src := e.pki.Source(kms1ID)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	hs := &http.Server{Handler: h, TLSConfig: identity.ServerTLSConfig(src, identity.MemberOf(src.TrustDomain())), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = hs.ServeTLS(lis, "", "") }()
	e.t.Cleanup(func() { hs.Close(); <-done })
	return "https://" + lis.Addr().String()
}

// httpsClient calls as id and accepts only a KMS of the region.
func (e *env) httpsClient(id string) *http.Client {
	e.t.Helper()
	allow, err := identity.ParseAllowlist(e.pki.Source(id).TrustDomain(), "kms/us-east/*")
	if err != nil {
		e.t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: identity.ClientTLSConfig(e.pki.Source(id), allow.Authorize), ForceAttemptHTTP2: true}
	e.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// vaultAnswer is an answer of the transit API.
type vaultAnswer struct {
	code      int
	requestID string // the X-Request-Id header
	Data      struct {
		Ciphertext    string           `json:"ciphertext"`
		Plaintext     string           `json:"plaintext"`
		KeyVersion    uint32           `json:"key_version"`
		Type          string           `json:"type"`
		LatestVersion uint32           `json:"latest_version"`
		Keys          map[string]int64 `json:"keys"`
	} `json:"data"`
	Errors []string `json:"errors"`
	body   string
}

func call(t *testing.T, c *http.Client, method, url string, body any, header ...string) vaultAnswer {
	t.Helper()
	var rd *bytes.Reader
	if body == nil {
		rd = bytes.NewReader(nil)
	} else {
		data, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx(t), method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(resp.Body); err != nil {
		t.Fatal(err)
	}
	a := vaultAnswer{code: resp.StatusCode, requestID: resp.Header.Get(transit.RequestIDHeader), body: buf.String()}
	if err := json.Unmarshal(buf.Bytes(), &a); err != nil {
		t.Fatalf("%s %s: answer %q: %v", method, url, buf.String(), err)
	}
	return a
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func readAudit(t *testing.T, s *server) []audit.Record {
	t.Helper()
	recs, err := audit.ReadFile(s.auditPath)
	if err != nil {
		t.Fatalf("audit.ReadFile = %v", err)
	}
	return recs
}

// findRecord returns the record with the request ID rid.
func findRecord(t *testing.T, recs []audit.Record, rid string) audit.Record {
	t.Helper()
	for _, r := range recs {
		if r.RequestID == rid {
			return r
		}
	}
	t.Fatalf("no audit record with request ID %q among %d", rid, len(recs))
	return audit.Record{}
}

// TestTransit drives the transit API of a real server over HTTPS with mTLS:
// ciphertexts convert losslessly between it and gRPC, the keysets' ACLs and
// the audit log are the gRPC API's, and the token is never recorded.
func TestTransit(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	base := e.transitServer(s) + "/v1/transit/"
	app, intruder := e.httpsClient(appID), e.httpsClient(otherID)
	grpcApp := e.client(appID, s)
	primary := e.ks.Primary()
	const token = "hvs.never-an-identity-7f3a"

	// HTTP encrypt, gRPC decrypt.
	dek, ad := []byte("a 32-byte data encryption key!!!"), []byte("object/42")
	a := call(t, app, http.MethodPost, base+"encrypt/"+ledger, map[string]string{"plaintext": b64(dek), "associated_data": b64(ad)},
		transit.RequestIDHeader, "req-encrypt-1", "X-Vault-Token", token)
	if a.code != http.StatusOK || a.Data.KeyVersion != primary || !strings.HasPrefix(a.Data.Ciphertext, fmt.Sprintf("vault:v%d:", primary)) {
		t.Fatalf("encrypt over HTTPS = %d %s, want 200, key_version %d", a.code, a.body, primary)
	}
	ct, _, err := transit.ParseCiphertext(a.Data.Ciphertext)
	if err != nil {
		t.Fatal(err)
	}
	if got := decrypt(t, grpcApp, ledger, ct, ad).GetPlaintext(); !bytes.Equal(got, dek) {
		t.Errorf("gRPC Decrypt of the HTTP ciphertext = %q, want the DEK", got)
	}
	// gRPC encrypt, HTTP decrypt (under the legacy context field).
	g := encrypt(t, grpcApp, ledger, dek, ad)
	vct, err := transit.FormatCiphertext(g.GetCiphertext())
	if err != nil {
		t.Fatal(err)
	}
	a = call(t, app, http.MethodPut, base+"decrypt/payments%2Fledger", map[string]string{"ciphertext": vct, "context": b64(ad)})
	if a.code != http.StatusOK || a.Data.Plaintext != b64(dek) {
		t.Errorf("HTTP decrypt of the gRPC ciphertext = %d %s, want 200 and the DEK", a.code, a.body)
	}

	// The audit record of the HTTP call is the gRPC one's, marked via=transit.
	got := findRecord(t, readAudit(t, s), "req-encrypt-1")
	want := audit.Record{RequestID: "req-encrypt-1", Identity: appID, Operation: "/cairn.kms.v1.KMS/Encrypt", Outcome: audit.OutcomeOK,
		Target: audit.Target{Region: region, Keyset: ledger, KeyVersion: primary, Resource: "via=transit"}}
	if diff := cmp.Diff(want, got, cmpIgnoreTime); diff != "" {
		t.Errorf("audit record of the HTTP encrypt (-want +got):\n%s", diff)
	}

	// Refusals: no ACL, tampered, wrong associated data, unknown keyset.
	a = call(t, intruder, http.MethodPost, base+"encrypt/"+ledger, map[string]string{"plaintext": b64(dek)})
	if a.code != http.StatusForbidden || a.requestID == "" {
		t.Errorf("encrypt by a caller on no ACL = %d %s (X-Request-Id %q), want 403 with a request ID", a.code, a.body, a.requestID)
	} else if r := findRecord(t, readAudit(t, s), a.requestID); r.Outcome != audit.OutcomeDenied || r.Identity != otherID || r.Target.Resource != "via=transit" {
		t.Errorf("audit record of the refused encrypt = %+v, want denied, %s, via=transit", r, otherID)
	}
	tampered := bytes.Clone(ct)
	tampered[len(tampered)-1] ^= 1
	tct, _ := transit.FormatCiphertext(tampered)
	for _, tc := range []struct {
		name, path, ct, ad string
		code               int
	}{
		{"tampered", "decrypt/" + ledger, tct, b64(ad), 400},
		{"wrong associated data", "decrypt/" + ledger, vct, b64([]byte("object/43")), 400},
		{"unknown keyset", "decrypt/payments/nothing", vct, b64(ad), 403},
	} {
		a := call(t, app, http.MethodPost, base+tc.path, map[string]string{"ciphertext": tc.ct, "associated_data": tc.ad})
		if a.code != tc.code || len(a.Errors) != 1 || a.requestID == "" {
			t.Errorf("%s: decrypt = %d %s, want %d, one error and a request ID", tc.name, a.code, a.body, tc.code)
		}
		if tc.name != "unknown keyset" && a.Errors[0] != decryptM {
			t.Errorf("%s: error %q, want %q (one message, no oracle)", tc.name, a.Errors[0], decryptM)
		}
	}

	// key_version: the primary's ID is accepted; any other refused before
	// anything is encrypted.
	before := s.status(t).GetKeysets()[0].GetVersions()[0].GetEncryptCount()
	a = call(t, app, http.MethodPost, base+"encrypt/"+ledger, map[string]any{"plaintext": b64(dek), "key_version": primary ^ 1})
	if a.code != http.StatusBadRequest || len(a.Errors) != 1 || !strings.Contains(a.Errors[0], fmt.Sprintf("primary version, %d", primary)) {
		t.Errorf("encrypt with key_version %d = %d %s, want 400 naming the primary", primary^1, a.code, a.body)
	}
	if after := s.status(t).GetKeysets()[0].GetVersions()[0].GetEncryptCount(); after != before {
		t.Errorf("a refused key_version changed the encrypt count from %d to %d", before, after)
	}
	a = call(t, app, http.MethodPost, base+"encrypt/"+ledger, map[string]any{"plaintext": b64(dek), "key_version": primary})
	if a.code != http.StatusOK || a.Data.KeyVersion != primary {
		t.Errorf("encrypt with key_version %d (the primary) = %d %s, want 200", primary, a.code, a.body)
	}

	// Rewrap's record names both versions.
	a = call(t, app, http.MethodPost, base+"rewrap/"+ledger, map[string]string{"ciphertext": vct, "associated_data": b64(ad)}, transit.RequestIDHeader, "req-rewrap-1")
	if a.code != http.StatusOK || a.Data.KeyVersion != primary {
		t.Errorf("rewrap = %d %s, want 200", a.code, a.body)
	}
	if r := findRecord(t, readAudit(t, s), "req-rewrap-1"); r.Operation != "/cairn.kms.v1.KMS/Rewrap" || r.Target.Resource != fmt.Sprintf("source_key_id=%d via=transit", primary) {
		t.Errorf("rewrap audit record = %+v, want Rewrap with resource source_key_id=%d via=transit", r, primary)
	}

	// The key read: what the caller may see, and, for a caller on no ACL,
	// exactly the unknown keyset's answer.
	a = call(t, app, http.MethodGet, base+"keys/"+ledger, nil, transit.RequestIDHeader, "req-read-1")
	if a.code != http.StatusOK || a.Data.Type != "aes256-gcm96" || a.Data.LatestVersion != primary || len(a.Data.Keys) != 1 {
		t.Errorf("keys read = %d %s, want 200, aes256-gcm96, latest_version %d, one version", a.code, a.body, primary)
	}
	if _, ok := a.Data.Keys[fmt.Sprint(primary)]; !ok {
		t.Errorf("keys read: keys %v lack the primary %d", a.Data.Keys, primary)
	}
	if r := findRecord(t, readAudit(t, s), "req-read-1"); r.Operation != "/cairn.kms.v1.Transit/ReadKey" || r.Outcome != audit.OutcomeOK || r.Target.Keyset != ledger {
		t.Errorf("keys read audit record = %+v, want /cairn.kms.v1.Transit/ReadKey ok on %s", r, ledger)
	}
	denied := call(t, intruder, http.MethodGet, base+"keys/"+ledger, nil)
	unknown := call(t, intruder, http.MethodGet, base+"keys/payments/nothing", nil)
	if denied.code != http.StatusNotFound || denied.body != unknown.body || denied.code != unknown.code {
		t.Errorf("keys read by a caller on no ACL = %d %q; of an unknown keyset = %d %q; want the same 404", denied.code, denied.body, unknown.code, unknown.body)
	}

	// Data keys.
	a = call(t, app, http.MethodPost, base+"datakey/plaintext/"+ledger, map[string]any{"bits": 128, "context": b64(ad)})
	pk, _ := base64.StdEncoding.DecodeString(a.Data.Plaintext)
	wk, _, err := transit.ParseCiphertext(a.Data.Ciphertext)
	if a.code != http.StatusOK || len(pk) != 16 || err != nil {
		t.Fatalf("datakey/plaintext bits 128 = %d %s, want 200 and a 16-byte key", a.code, a.body)
	}
	if got := decrypt(t, grpcApp, ledger, wk, ad).GetPlaintext(); !bytes.Equal(got, pk) {
		t.Errorf("gRPC Decrypt of the datakey ciphertext = %x, want the datakey %x", got, pk)
	}

	// Health.
	a = call(t, app, http.MethodGet, strings.TrimSuffix(base, "transit/")+"sys/health", nil)
	if a.code != http.StatusOK || !strings.Contains(a.body, `"sealed":false`) {
		t.Errorf("sys/health = %d %s, want 200 unsealed", a.code, a.body)
	}

	// The token is no identity and is never recorded.
	data, err := os.ReadFile(s.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, []byte(token)) || bytes.Contains(data, dek) || bytes.Contains(data, []byte(b64(dek))) {
		t.Errorf("the audit log holds the token or the DEK")
	}
}

var cmpIgnoreTime = cmp.FilterPath(func(p cmp.Path) bool { s := p.Last().String(); return s == ".Time" || s == ".Prev" }, cmp.Ignore())

// failingWriter is an audit sink that fails every write once failing is
// set, as a full disk does.
type failingWriter struct{ failing atomic.Bool }

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.failing.Load() {
		return 0, errors.New("no space left on device")
	}
	return len(p), nil
}

// TestTransitHealthWithBrokenAuditLog: once the audit log is broken (and
// every call refused), sys/health answers 503 sealed, as gRPC health
// answers NOT_SERVING: a load balancer must take the server out.
func TestTransitHealthWithBrokenAuditLog(t *testing.T) {
	e := newEnv(t)
	sink := &failingWriter{}
	alog := audit.NewWriter(sink, audit.Options{})
	t.Cleanup(func() { alog.Close() }) // after the server's Close
	s := e.start(kms1ID, "", func(c *kms.Config) { c.Audit = alog })
	e.apply(s, e.bundle(e.ks))
	base := e.transitServer(s)
	app := e.httpsClient(appID)
	if a := call(t, app, http.MethodGet, base+"/v1/sys/health", nil); a.code != http.StatusOK {
		t.Fatalf("sys/health serving = %d %s, want 200", a.code, a.body)
	}
	sink.failing.Store(true)
	if a := call(t, app, http.MethodPost, base+"/v1/transit/encrypt/"+ledger, map[string]string{"plaintext": b64([]byte("x"))}); a.code == http.StatusOK {
		t.Errorf("encrypt whose audit record cannot be written = 200, want refused")
	}
	if ok, _ := s.Readiness(); ok {
		t.Fatalf("Readiness() = ready after the audit log broke, want not ready")
	}
	if a := call(t, app, http.MethodGet, base+"/v1/sys/health", nil); a.code != http.StatusServiceUnavailable || !strings.Contains(a.body, `"sealed":true`) {
		t.Errorf("sys/health with the audit log broken = %d %s, want 503 sealed", a.code, a.body)
	}
}

// A server without a bundle answers the data plane 503 and health sealed;
// a request that did not come over TLS has no identity.
func TestTransitNotReadyAndNoTLS(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	base := e.transitServer(s)
	app := e.httpsClient(appID)
	a := call(t, app, http.MethodPost, base+"/v1/transit/encrypt/"+ledger, map[string]string{"plaintext": b64([]byte("x"))})
	if a.code != http.StatusServiceUnavailable || len(a.Errors) != 1 || !strings.Contains(a.Errors[0], "not ready") || a.requestID == "" {
		t.Errorf("encrypt before any bundle = %d %s, want 503 not ready with a request ID", a.code, a.body)
	}
	a = call(t, app, http.MethodGet, base+"/v1/sys/health", nil)
	if a.code != http.StatusServiceUnavailable || !strings.Contains(a.body, `"sealed":true`) || !strings.Contains(a.body, `"initialized":true`) {
		t.Errorf("sys/health before any bundle = %d %s, want 503 sealed", a.code, a.body)
	}
	rid := callRID(t, app, base)
	if r := findRecord(t, readAudit(t, s), rid); r.Outcome != audit.OutcomeError || r.Code != "Unavailable" {
		t.Errorf("audit record of a not-ready call = %+v, want error Unavailable", r)
	}

	h, err := s.Transit(transit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "/v1/transit/encrypt/"+ledger, strings.NewReader(`{"plaintext":"eA=="}`)))
	if w.Code != http.StatusUnauthorized || !strings.Contains(w.Body.String(), "did not come over TLS") {
		t.Errorf("a request without TLS = %d %s, want 401", w.Code, w.Body.String())
	}
}

// callRID makes a failing decrypt and returns its X-Request-Id.
func callRID(t *testing.T, c *http.Client, base string) string {
	t.Helper()
	a := call(t, c, http.MethodPost, base+"/v1/transit/decrypt/"+ledger, map[string]string{"ciphertext": "vault:v1:AQAAAAF4"})
	if a.requestID == "" {
		t.Fatalf("decrypt = %d %s without X-Request-Id", a.code, a.body)
	}
	return a.requestID
}

func TestTransitMountOption(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	if _, err := s.Transit(transit.Options{Mount: "../x"}); err == nil || !strings.Contains(err.Error(), "transit: mount") {
		t.Errorf("Transit(mount ../x) = %v, want an error naming the mount", err)
	}
}
