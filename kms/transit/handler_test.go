package transit_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"

	"github.com/cairnkms/cairn/kms/transit"
)

var testLimits = transit.Limits{MaxBatch: 10, MaxPayload: 1024, MaxCiphertext: 1024 + 45, MaxMessage: 1 << 20}

func newHandler(t *testing.T, f *fake) *transit.Handler {
	t.Helper()
	h, err := transit.NewHandler(f, transit.Options{Limits: testLimits, Version: "cairn test",
		Now: func() time.Time { return time.Unix(1_800_000_000, 0) }})
	if err != nil {
		t.Fatalf("NewHandler = %v", err)
	}
	return h
}

// answer is any Vault answer: the envelope or the error body.
type answer struct {
	code      int
	header    http.Header
	RequestID string          `json:"request_id"`
	Data      json.RawMessage `json:"data"`
	Warnings  []string        `json:"warnings"`
	MountType string          `json:"mount_type"`
	Errors    []string        `json:"errors"`
}

func do(t *testing.T, h http.Handler, method, path string, body any, header ...string) answer {
	t.Helper()
	var rd *bytes.Reader
	switch b := body.(type) {
	case nil:
		rd = bytes.NewReader(nil)
	case string:
		rd = bytes.NewReader([]byte(b))
	default:
		data, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	r := httptest.NewRequest(method, path, rd)
	for i := 0; i+1 < len(header); i += 2 {
		r.Header.Set(header[i], header[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	a := answer{code: w.Code, header: w.Header()}
	if method != http.MethodHead {
		if err := json.Unmarshal(w.Body.Bytes(), &a); err != nil {
			t.Fatalf("%s %s: answer %q is not JSON: %v", method, path, w.Body.String(), err)
		}
	}
	if ct := w.Header().Get("Content-Type"); method != http.MethodHead && ct != "application/json" {
		t.Errorf("%s %s: Content-Type %q, want application/json", method, path, ct)
	}
	return a
}

func (a answer) data(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(a.Data, v); err != nil {
		t.Fatalf("data %s: %v", a.Data, err)
	}
}

func b64s(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

type cipherData struct {
	Ciphertext string `json:"ciphertext"`
	KeyVersion uint32 `json:"key_version"`
	Plaintext  string `json:"plaintext"`
}

// seal encrypts pt through the handler with the given body fields and
// returns the ciphertext.
func seal(t *testing.T, h http.Handler, pt string, fields map[string]any) string {
	t.Helper()
	body := map[string]any{"plaintext": b64s(pt)}
	for k, v := range fields {
		body[k] = v
	}
	a := do(t, h, http.MethodPost, "/v1/transit/encrypt/"+fakeKeyset, body)
	if a.code != http.StatusOK {
		t.Fatalf("encrypt = %d %v, want 200", a.code, a.Errors)
	}
	var d cipherData
	a.data(t, &d)
	return d.Ciphertext
}

func TestEncryptDecrypt(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	a := do(t, h, http.MethodPut, "/v1/transit/encrypt/payments/ledger", map[string]any{"plaintext": b64s("dek bytes"), "associated_data": b64s("obj-1")},
		"X-Vault-Token", "s.not-an-identity")
	if a.code != http.StatusOK || a.MountType != "transit" || a.RequestID != "audited-1" {
		t.Fatalf("encrypt = %d, mount_type %q, request_id %q, errors %v; want 200, transit, audited-1", a.code, a.MountType, a.RequestID, a.Errors)
	}
	var enc cipherData
	a.data(t, &enc)
	if want := fmt.Sprintf("vault:v%d:", f.primary); !strings.HasPrefix(enc.Ciphertext, want) || enc.KeyVersion != f.primary {
		t.Errorf("encrypt data = %+v, want a ciphertext starting %q and key_version %d", enc, want, f.primary)
	}
	if strings.Contains(string(a.Data), b64s("dek bytes")) {
		t.Errorf("encrypt answer %s holds the plaintext", a.Data)
	}
	if got := a.header.Get(transit.RequestIDHeader); got != "" {
		t.Errorf("a successful call answers X-Request-Id %q, want none (as gRPC)", got)
	}
	a = do(t, h, http.MethodPost, "/v1/transit/decrypt/payments%2Fledger", map[string]any{"ciphertext": enc.Ciphertext, "context": b64s("obj-1")})
	var dec cipherData
	a.data(t, &dec)
	if a.code != http.StatusOK || dec.Plaintext != b64s("dek bytes") {
		t.Errorf("decrypt = %d %+v %v, want 200 and the plaintext", a.code, dec, a.Errors)
	}
	calls, keysets, ads, _ := f.record()
	if diff := cmp.Diff([]string{"Encrypt", "Decrypt"}, calls); diff != "" {
		t.Errorf("backend calls (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{fakeKeyset, fakeKeyset}, keysets); diff != "" {
		t.Errorf("keysets (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([][]byte{[]byte("obj-1"), []byte("obj-1")}, ads); diff != "" {
		t.Errorf("associated data (-want +got):\n%s", diff)
	}
}

// The keyset name is the whole rest of the path: '/' as is, %2F, and the
// %252F tink-go-hcvault's path produces through the Vault client.
func TestKeysetNames(t *testing.T) {
	for _, tc := range []struct {
		path string
		code int
		want string // the keyset the backend saw, or the error
	}{
		{"/v1/transit/encrypt/payments/ledger", 200, fakeKeyset},
		{"/v1/transit/encrypt/payments%2Fledger", 200, fakeKeyset},
		{"/v1/transit/encrypt/payments%252Fledger", 200, fakeKeyset},
		{"/v1/transit/encrypt/payments%252fledger", 200, fakeKeyset},
		{"/v1/transit/encrypt/solo", 400, "no such keyset"},
		{"/v1/transit/encrypt/Payments/Ledger", 400, "use lowercase segments"},
		{"/v1/transit/encrypt/payments/../ledger", 400, "use lowercase segments"},
		{"/v1/transit/encrypt/payments//ledger", 400, "use lowercase segments"},
		{"/v1/transit/encrypt/payments%25zz", 400, "bad percent-encoding"},
		{"/v1/transit/encrypt/", 404, "unsupported path"},
		{"/v1/transit/encrypt", 404, "unsupported path"},
	} {
		f := newFake(t)
		a := do(t, newHandler(t, f), http.MethodPost, tc.path, map[string]any{"plaintext": b64s("x")})
		_, keysets, _, _ := f.record()
		got := strings.Join(a.Errors, "; ")
		if a.code == 200 {
			got = strings.Join(keysets, ",")
		}
		if a.code != tc.code || !strings.Contains(got, tc.want) {
			t.Errorf("POST %s = %d %q, want %d %q", tc.path, a.code, got, tc.code, tc.want)
		}
	}
}

// associated_data and context are both Cairn's associated data.
func TestAssociatedData(t *testing.T) {
	for _, tc := range []struct {
		name   string
		fields map[string]any
		code   int
		ad     string
	}{
		{"none", nil, 200, ""},
		{"associated_data", map[string]any{"associated_data": b64s("a")}, 200, "a"},
		{"context", map[string]any{"context": b64s("c")}, 200, "c"},
		{"both equal", map[string]any{"context": b64s("s"), "associated_data": b64s("s")}, 200, "s"},
		{"empty context", map[string]any{"context": "", "associated_data": b64s("a")}, 200, "a"},
		{"both differ", map[string]any{"context": b64s("c"), "associated_data": b64s("a")}, 400, ""},
		{"bad base64", map[string]any{"context": "%%%"}, 400, ""},
		{"nonce", map[string]any{"nonce": b64s("123456789012")}, 400, ""},
		{"iv", map[string]any{"iv": b64s("1234567890123456")}, 400, ""},
		{"padding", map[string]any{"padding_scheme": "oaep"}, 400, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t)
			body := map[string]any{"plaintext": b64s("secret-pt")}
			for k, v := range tc.fields {
				body[k] = v
			}
			a := do(t, newHandler(t, f), http.MethodPost, "/v1/transit/encrypt/"+fakeKeyset, body)
			calls, _, ads, _ := f.record()
			if a.code != tc.code {
				t.Fatalf("encrypt with %v = %d %v, want %d", tc.fields, a.code, a.Errors, tc.code)
			}
			if tc.code != 200 {
				if len(calls) != 0 {
					t.Errorf("a refused request reached the backend: %v", calls)
				}
				if len(a.Errors) != 1 || strings.Contains(a.Errors[0], "secret-pt") || strings.Contains(a.Errors[0], b64s("secret-pt")) {
					t.Errorf("errors = %q, want one message without the plaintext", a.Errors)
				}
				if id := a.header.Get(transit.RequestIDHeader); id != "" {
					t.Errorf("a request refused before any call answers X-Request-Id %q, want none", id)
				}
				return
			}
			if len(ads) != 1 || string(ads[0]) != tc.ad {
				t.Errorf("associated data %q, want %q", ads, tc.ad)
			}
		})
	}
}

func TestKeyVersion(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	for _, tc := range []struct {
		kv   any
		code int
		want uint32 // the version the backend got
	}{
		{nil, 200, 0},
		{0, 200, 0},
		{"0", 200, 0},
		{f.primary, 200, f.primary},
		{fmt.Sprint(f.primary), 200, f.primary},
		{f.primary ^ 1, 400, f.primary ^ 1}, // refused by the backend
		{-1, 400, 0},
		{uint64(1) << 32, 400, 0},
		{"seven", 400, 0},
		{1.5, 400, 0},
	} {
		before, _, _, _ := f.record()
		body := map[string]any{"plaintext": b64s("x")}
		if tc.kv != nil {
			body["key_version"] = tc.kv
		}
		a := do(t, h, http.MethodPost, "/v1/transit/encrypt/"+fakeKeyset, body)
		calls, _, _, versions := f.record()
		if a.code != tc.code {
			t.Errorf("encrypt with key_version %v = %d %v, want %d", tc.kv, a.code, a.Errors, tc.code)
			continue
		}
		reached := len(calls) > len(before)
		if reached && versions[len(versions)-1] != tc.want {
			t.Errorf("encrypt with key_version %v: the backend got version %d, want %d", tc.kv, versions[len(versions)-1], tc.want)
		}
		if !reached && (tc.code == 200 || tc.want != 0) {
			t.Errorf("encrypt with key_version %v never reached the backend", tc.kv)
		}
	}
}

func TestDecryptRefusesBadCiphertexts(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	ct := seal(t, h, "pt", nil)
	raw, _, _ := transit.ParseCiphertext(ct)
	other := fmt.Sprintf("vault:v%d:%s", f.primary+1, strings.SplitN(ct, ":", 3)[2])
	tampered := raw[: len(raw)-1 : len(raw)-1]
	tampered = append(tampered, raw[len(raw)-1]^1)
	tamperedCT, _ := transit.FormatCiphertext(tampered)
	for _, tc := range []struct {
		name, ct, ad string
		backend      bool
		want         string
	}{
		{"missing", "", "", false, "missing ciphertext to decrypt"},
		{"not vault form", base64.StdEncoding.EncodeToString(raw), "", false, "want the form"},
		{"version is not the key ID", other, "", false, "is not the ciphertext's key version"},
		{"tampered", tamperedCT, "", true, "does not decrypt"},
		{"wrong associated data", ct, b64s("other"), true, "does not decrypt"},
	} {
		_, _, _, before := f.record()
		a := do(t, h, http.MethodPost, "/v1/transit/decrypt/"+fakeKeyset, map[string]any{"ciphertext": tc.ct, "associated_data": tc.ad})
		calls, _, _, after := f.record()
		_ = calls
		if a.code != http.StatusBadRequest || len(a.Errors) != 1 || !strings.Contains(a.Errors[0], tc.want) {
			t.Errorf("%s: decrypt = %d %q, want 400 %q", tc.name, a.code, a.Errors, tc.want)
		}
		if reached := len(after) > len(before); reached != tc.backend {
			t.Errorf("%s: reached the backend %v, want %v", tc.name, reached, tc.backend)
		}
	}
}

type encryptItem struct {
	Ciphertext string  `json:"ciphertext"`
	KeyVersion *uint32 `json:"key_version"`
	Plaintext  string  `json:"plaintext"`
	Error      string  `json:"error"`
	Reference  string  `json:"reference"`
}

type batch struct {
	BatchResults []encryptItem `json:"batch_results"`
}

// A batch reports each item's error as Vault does: 400 when an item failed
// for its input, 500 when only internal errors did, the
// partial_failure_response_code when some item succeeded.
func TestBatch(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	good := seal(t, h, "one", map[string]any{"associated_data": b64s("ad-1")})
	for _, tc := range []struct {
		name     string
		path     string
		body     map[string]any
		code     int
		errs     []string // per item: "" or a substring of its error
		warnings []string
	}{
		{"encrypt all ok", "encrypt", map[string]any{"batch_input": []any{
			map[string]any{"plaintext": b64s("a"), "reference": "r1"},
			map[string]any{"plaintext": b64s("b"), "context": b64s("c")},
		}}, 200, []string{"", ""}, nil},
		{"encrypt bad item", "encrypt", map[string]any{"batch_input": []any{
			map[string]any{"plaintext": b64s("a"), "reference": "r1"},
			map[string]any{"plaintext": "not base64!", "reference": "r2"},
			map[string]any{"reference": "r3"},
		}}, 400, []string{"", "plaintext is not valid base64", "missing plaintext to encrypt"}, nil},
		{"encrypt bad item, partial code", "encrypt", map[string]any{"partial_failure_response_code": 207, "batch_input": []any{
			map[string]any{"plaintext": b64s("a")},
			map[string]any{"plaintext": b64s("b"), "associated_data": b64s("x"), "context": b64s("y")},
		}}, 207, []string{"", "associated_data and context differ"}, nil},
		{"encrypt partial code out of range", "encrypt", map[string]any{"partial_failure_response_code": "42", "batch_input": []any{
			map[string]any{"plaintext": b64s("a")},
			map[string]any{"plaintext": "!"},
		}}, 400, []string{"", "not valid base64"}, []string{"invalid HTTP response code override from partial_failure_response_code, reverting to 400"}},
		{"encrypt all fail, partial code", "encrypt", map[string]any{"partial_failure_response_code": 200, "batch_input": []any{
			map[string]any{"plaintext": "!"},
		}}, 400, []string{"not valid base64"}, nil},
		{"encrypt internal item error", "encrypt", map[string]any{"batch_input": []any{
			map[string]any{"plaintext": b64s("a")},
			map[string]any{"plaintext": b64s("b"), "associated_data": b64s(internalAD)},
		}}, 500, []string{"", "encryption failed"}, nil},
		{"decrypt bad items", "decrypt", map[string]any{"batch_input": []any{
			map[string]any{"ciphertext": good, "associated_data": b64s("ad-1"), "reference": "ok"},
			map[string]any{"ciphertext": good, "associated_data": b64s("wrong")},
			map[string]any{"ciphertext": "vault:v1:AAAA"},
			map[string]any{},
		}}, 400, []string{"", "does not decrypt", "no Tink key ID prefix", "missing ciphertext"}, nil},
		{"decrypt internal only", "decrypt", map[string]any{"batch_input": []any{
			map[string]any{"ciphertext": good, "associated_data": b64s("ad-1")},
			map[string]any{"ciphertext": good, "associated_data": b64s(internalAD)},
		}}, 500, []string{"", "internal"}, nil},
		{"rewrap item errors are 200", "rewrap", map[string]any{"batch_input": []any{
			map[string]any{"ciphertext": good, "context": b64s("ad-1"), "reference": "x"},
			map[string]any{"ciphertext": good, "context": b64s("wrong")},
			map[string]any{"ciphertext": "garbage"},
		}}, 200, []string{"", "does not decrypt", "want the form"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := do(t, h, http.MethodPost, "/v1/transit/"+tc.path+"/"+fakeKeyset, tc.body)
			if a.code != tc.code {
				t.Fatalf("%s batch = %d %v, want %d", tc.path, a.code, a.Errors, tc.code)
			}
			var b batch
			a.data(t, &b)
			if len(b.BatchResults) != len(tc.errs) {
				t.Fatalf("batch_results = %+v, want %d items", b.BatchResults, len(tc.errs))
			}
			items := tc.body["batch_input"].([]any)
			for i, want := range tc.errs {
				got := b.BatchResults[i]
				if ref, _ := items[i].(map[string]any)["reference"].(string); got.Reference != ref {
					t.Errorf("item %d: reference %q, want %q", i, got.Reference, ref)
				}
				if want == "" {
					if got.Error != "" || (got.Ciphertext == "" && got.Plaintext == "") {
						t.Errorf("item %d = %+v, want a result", i, got)
					}
					if got.Ciphertext != "" && (got.KeyVersion == nil || *got.KeyVersion != f.primary) {
						t.Errorf("item %d: key_version %v, want %d", i, got.KeyVersion, f.primary)
					}
					continue
				}
				if !strings.Contains(got.Error, want) || got.Ciphertext != "" || got.Plaintext != "" {
					t.Errorf("item %d = %+v, want only an error saying %q", i, got, want)
				}
			}
			if diff := cmp.Diff(tc.warnings, a.Warnings); diff != "" {
				t.Errorf("warnings (-want +got):\n%s", diff)
			}
			if tc.code >= 400 && a.header.Get(transit.RequestIDHeader) == "" {
				t.Errorf("batch answered %d without X-Request-Id", tc.code)
			}
		})
	}
}

func TestBatchRefusals(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	many := make([]any, testLimits.MaxBatch+1)
	for i := range many {
		many[i] = map[string]any{"plaintext": b64s("x")}
	}
	for _, tc := range []struct {
		name, path string
		body       any
		code       int
		want       string
	}{
		{"empty", "encrypt", map[string]any{"batch_input": []any{}}, 400, "missing batch input"},
		{"too many", "encrypt", map[string]any{"batch_input": many}, 400, "more than the limit of 10"},
		{"two key versions", "encrypt", map[string]any{"batch_input": []any{
			map[string]any{"plaintext": b64s("a"), "key_version": 5}, map[string]any{"plaintext": b64s("b"), "key_version": 6}}}, 400, "name key versions 5 and 6"},
		{"not a list", "decrypt", map[string]any{"batch_input": "x"}, 400, "failed to parse JSON input"},
		{"unknown keyset", "decrypt/nope/nothing", map[string]any{"batch_input": []any{map[string]any{"ciphertext": "x"}}}, 400, "no such keyset"},
	} {
		path := "/v1/transit/" + tc.path
		if !strings.Contains(tc.path, "/") {
			path += "/" + fakeKeyset
		}
		a := do(t, h, http.MethodPost, path, tc.body)
		if a.code != tc.code || len(a.Errors) != 1 || !strings.Contains(a.Errors[0], tc.want) {
			t.Errorf("%s: %s = %d %q, want %d %q", tc.name, tc.path, a.code, a.Errors, tc.code, tc.want)
		}
	}
	// A rewrap batch fails as a whole on an error that is not the item's.
	f.fail("Rewrap", codes.PermissionDenied, "kms: permission denied: no")
	a := do(t, h, http.MethodPost, "/v1/transit/rewrap/"+fakeKeyset, map[string]any{"batch_input": []any{map[string]any{"ciphertext": seal(t, h, "x", nil)}}})
	if a.code != http.StatusForbidden || a.header.Get(transit.RequestIDHeader) == "" {
		t.Errorf("rewrap batch refused by the KMS = %d %v (X-Request-Id %q), want 403 with the request ID", a.code, a.Errors, a.header.Get(transit.RequestIDHeader))
	}
}

// TestBatchInputDecodedUpToTheLimit: a body of as many empty batch items
// as fit in the body limit ("[{},{},...]", 3 bytes each) is refused with
// 400 once past MaxBatch items, before the backend (the caller's identity,
// the KMS) is asked, and costs a few times its size, not the hundred-odd
// bytes per item of decoding all of them.
func TestBatchInputDecodedUpToTheLimit(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	var body bytes.Buffer
	body.WriteString(`{"batch_input":[{}`)
	for int64(body.Len())+5 <= h.BodyLimit() {
		body.WriteString(`,{}`)
	}
	body.WriteString(`]}`)
	items := (body.Len() - 17) / 3
	for _, op := range []string{"encrypt", "decrypt", "rewrap"} {
		r := httptest.NewRequest(http.MethodPost, "/v1/transit/"+op+"/"+fakeKeyset, bytes.NewReader(body.Bytes()))
		w := httptest.NewRecorder()
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		h.ServeHTTP(w, r)
		runtime.ReadMemStats(&after)
		want := fmt.Sprintf(`{"errors":["batch_input has more than the limit of %d items"]}`, testLimits.MaxBatch)
		if got := strings.TrimSpace(w.Body.String()); w.Code != http.StatusBadRequest || got != want {
			t.Errorf("%s of %d empty items = %d %s, want 400 %s", op, items, w.Code, got, want)
		}
		if n := after.TotalAlloc - before.TotalAlloc; n > 8*uint64(body.Len()) {
			t.Errorf("%s of a %d-byte body of %d empty items allocated %d KiB, want at most %d KiB", op, body.Len(), items, n>>10, 8*body.Len()>>10)
		}
	}
	if calls, _, _, _ := f.record(); len(calls) != 0 {
		t.Errorf("backend calls = %v, want none", calls)
	}
	// Exactly MaxBatch items are served.
	many := make([]any, testLimits.MaxBatch)
	for i := range many {
		many[i] = map[string]any{"plaintext": b64s("x")}
	}
	if a := do(t, h, http.MethodPost, "/v1/transit/encrypt/"+fakeKeyset, map[string]any{"batch_input": many}); a.code != http.StatusOK {
		t.Errorf("encrypt of %d items = %d %q, want 200", len(many), a.code, a.Errors)
	}
}

func TestDataKey(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	for _, tc := range []struct {
		kind string
		bits any
		code int
		n    int // plaintext key bytes
		want string
	}{
		{"plaintext", nil, 200, 32, ""},
		{"plaintext", 128, 200, 16, ""},
		{"plaintext", "256", 200, 32, ""},
		{"wrapped", 128, 200, 0, ""},
		{"plaintext", 512, 400, 0, "Cairn data keys are AES-128 or AES-256"},
		{"plaintext", 64, 400, 0, "invalid bit length"},
		{"both", 128, 400, 0, "must be 'plaintext' or 'wrapped'"},
	} {
		body := map[string]any{"context": b64s("obj")}
		if tc.bits != nil {
			body["bits"] = tc.bits
		}
		a := do(t, h, http.MethodPost, "/v1/transit/datakey/"+tc.kind+"/"+fakeKeyset, body)
		if a.code != tc.code || (tc.want != "" && (len(a.Errors) != 1 || !strings.Contains(a.Errors[0], tc.want))) {
			t.Errorf("datakey/%s bits %v = %d %q, want %d %q", tc.kind, tc.bits, a.code, a.Errors, tc.code, tc.want)
			continue
		}
		if tc.code != 200 {
			continue
		}
		var d cipherData
		a.data(t, &d)
		pt, err := base64.StdEncoding.DecodeString(d.Plaintext)
		if err != nil || len(pt) != tc.n || d.KeyVersion != f.primary {
			t.Errorf("datakey/%s bits %v = %d-byte key (%v), key_version %d; want %d bytes, %d", tc.kind, tc.bits, len(pt), err, d.KeyVersion, tc.n, f.primary)
		}
		if tc.kind == "wrapped" && strings.Contains(string(a.Data), `"plaintext"`) {
			t.Errorf("datakey/wrapped answered %s, want no plaintext field", a.Data)
		}
		// The wrapped key is a ciphertext of the keyset under the context.
		b := do(t, h, http.MethodPost, "/v1/transit/decrypt/"+fakeKeyset, map[string]any{"ciphertext": d.Ciphertext, "context": b64s("obj")})
		var dd cipherData
		b.data(t, &dd)
		if tc.kind == "plaintext" && (b.code != 200 || dd.Plaintext != d.Plaintext) {
			t.Errorf("decrypting the datakey ciphertext = %d %v, want the datakey's plaintext", b.code, b.Errors)
		}
	}
}

func TestReadKey(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	a := do(t, h, http.MethodGet, "/v1/transit/keys/"+fakeKeyset, nil)
	var got map[string]any
	a.data(t, &got)
	p := float64(f.primary)
	want := map[string]any{
		"name": fakeKeyset, "type": "aes256-gcm96", "keys": map[string]any{fmt.Sprint(f.primary): float64(0)},
		"latest_version": p, "min_available_version": float64(0), "min_decryption_version": p, "min_encryption_version": float64(0),
		"deletion_allowed": false, "derived": false, "exportable": false, "allow_plaintext_backup": false, "imported_key": false,
		"supports_encryption": true, "supports_decryption": true, "supports_derivation": false, "supports_signing": false,
	}
	if a.code != http.StatusOK {
		t.Fatalf("keys read = %d %v, want 200", a.code, a.Errors)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("keys read data (-want +got):\n%s", diff)
	}
	// Vault answers the read of a missing key with 404 and no error text.
	a = do(t, h, http.MethodGet, "/v1/transit/keys/payments/nothing", nil)
	if a.code != http.StatusNotFound || a.Errors == nil || len(a.Errors) != 0 {
		t.Errorf("keys read of an unknown keyset = %d %#v, want 404 and errors []", a.code, a.Errors)
	}
	f.fail("ReadKey", codes.Unavailable, "kms: not ready: no bundle applied yet")
	a = do(t, h, http.MethodGet, "/v1/transit/keys/"+fakeKeyset, nil)
	if a.code != http.StatusServiceUnavailable || a.header.Get(transit.RequestIDHeader) == "" {
		t.Errorf("keys read when not ready = %d %v, want 503 with X-Request-Id", a.code, a.Errors)
	}
}

func TestHealth(t *testing.T) {
	f := newFake(t)
	h := newHandler(t, f)
	type health struct {
		Initialized, Sealed, Standby bool
		ServerTimeUTC                int64  `json:"server_time_utc"`
		Version                      string `json:"version"`
	}
	for _, tc := range []struct {
		ready bool
		query string
		code  int
	}{
		{true, "", 200},
		{false, "", 503},
		{false, "?sealedcode=299&uninitcode=299&standbycode=299&drsecondarycode=299&performancestandbycode=299", 299},
		{true, "?activecode=204", 204},
	} {
		f.mu.Lock()
		f.ready = tc.ready
		f.mu.Unlock()
		r := httptest.NewRequest(http.MethodGet, transit.HealthPath+tc.query, nil)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		var got health
		if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil && tc.code != 204 {
			t.Fatal(err)
		}
		want := health{Initialized: true, Sealed: !tc.ready, ServerTimeUTC: 1_800_000_000, Version: "cairn test"}
		if w.Code != tc.code || (tc.code != 204 && got != want) {
			t.Errorf("health%s ready=%v = %d %+v, want %d %+v", tc.query, tc.ready, w.Code, got, tc.code, want)
		}
	}
	if a := do(t, h, http.MethodGet, transit.HealthPath+"?sealedcode=abc", nil); a.code != 400 {
		t.Errorf("health with a bad code = %d, want 400", a.code)
	}
	if a := do(t, h, http.MethodGet, transit.HealthPath+"?sealedcode=42", nil); a.code != 400 {
		t.Errorf("health with a code outside 200-599 = %d, want 400", a.code)
	}
	f.mu.Lock()
	f.ready = false
	f.mu.Unlock()
	if a := do(t, h, http.MethodHead, transit.HealthPath, nil); a.code != 503 {
		t.Errorf("HEAD health not ready = %d, want 503", a.code)
	}
	if a := do(t, h, http.MethodPost, transit.HealthPath, nil); a.code != 405 {
		t.Errorf("POST health = %d, want 405", a.code)
	}
	if calls, _, _, _ := f.record(); len(calls) != 0 {
		t.Errorf("health made backend calls %v, want none", calls)
	}
}

func TestRouting(t *testing.T) {
	h := newHandler(t, newFake(t))
	for _, tc := range []struct {
		method, path string
		code         int
		allow        string
	}{
		{http.MethodGet, "/v1/transit/encrypt/" + fakeKeyset, 405, "POST, PUT"},
		{http.MethodDelete, "/v1/transit/decrypt/" + fakeKeyset, 405, "POST, PUT"},
		{http.MethodPost, "/v1/transit/keys/" + fakeKeyset, 405, "GET"},
		{http.MethodDelete, "/v1/transit/keys/" + fakeKeyset, 405, "GET"},
		{http.MethodPost, "/v1/transit/sign/" + fakeKeyset, 404, ""},
		{http.MethodPost, "/v1/transit/hmac/" + fakeKeyset, 404, ""},
		{http.MethodPost, "/v1/secret/encrypt/" + fakeKeyset, 404, ""},
		{http.MethodGet, "/v1/sys/seal-status", 404, ""},
		{http.MethodGet, "/", 404, ""},
	} {
		a := do(t, h, tc.method, tc.path, nil)
		if a.code != tc.code || len(a.Errors) == 0 || a.header.Get("Allow") != tc.allow {
			t.Errorf("%s %s = %d %q (Allow %q), want %d with an error (Allow %q)", tc.method, tc.path, a.code, a.Errors, a.header.Get("Allow"), tc.code, tc.allow)
		}
	}
}

// Response wrapping and namespaces would change the answer: refused.
func TestVaultHeaders(t *testing.T) {
	for _, tc := range []struct {
		header, value string
		code          int
	}{
		{"X-Vault-Token", "hvs.anything", 200},
		{"X-Vault-Request", "true", 200},
		{"X-Vault-Namespace", "root/", 200},
		{"X-Vault-Namespace", "admin", 400},
		{"X-Vault-Wrap-TTL", "60s", 400},
	} {
		f := newFake(t)
		a := do(t, newHandler(t, f), http.MethodPost, "/v1/transit/encrypt/"+fakeKeyset, map[string]any{"plaintext": b64s("x")}, tc.header, tc.value)
		if calls, _, _, _ := f.record(); a.code != tc.code || (tc.code != 200 && len(calls) != 0) {
			t.Errorf("encrypt with %s: %s = %d %v (backend calls %v), want %d", tc.header, tc.value, a.code, a.Errors, calls, tc.code)
		}
	}
}

func TestBodies(t *testing.T) {
	h := newHandler(t, newFake(t))
	big := strings.Repeat("A", int(h.BodyLimit()))
	for _, tc := range []struct {
		name, body string
		code       int
		want       string
	}{
		{"too large", `{"plaintext":"` + big + `"}`, 413, "request body too large"},
		{"not JSON", `plaintext=abc`, 400, "failed to parse JSON input"},
		{"not an object", `["abc"]`, 400, "failed to parse JSON input"},
		{"truncated", `{"plaintext":"c2VjcmV0`, 400, "failed to parse JSON input"},
		{"trailing data", `{"plaintext":"eA=="} {}`, 400, "data after the JSON object"},
		{"plaintext not a string", `{"plaintext":5}`, 400, "field plaintext"},
		{"empty body", ``, 400, "missing plaintext to encrypt"},
	} {
		a := do(t, h, http.MethodPost, "/v1/transit/encrypt/"+fakeKeyset, tc.body)
		if a.code != tc.code || len(a.Errors) != 1 || !strings.Contains(a.Errors[0], tc.want) {
			t.Errorf("%s: encrypt = %d %.200q, want %d %q", tc.name, a.code, a.Errors, tc.code, tc.want)
		}
		if strings.Contains(strings.Join(a.Errors, " "), "c2VjcmV0") {
			t.Errorf("%s: the error %q quotes the plaintext", tc.name, a.Errors)
		}
	}
}

// Backend errors map through the table, and carry the request ID the call
// was audited under.
func TestBackendErrors(t *testing.T) {
	for _, tc := range []struct {
		code codes.Code
		http int
	}{
		{codes.InvalidArgument, 400},
		{codes.NotFound, 400},
		{codes.FailedPrecondition, 400},
		{codes.PermissionDenied, 403},
		{codes.Unauthenticated, 401},
		{codes.ResourceExhausted, 429},
		{codes.Unavailable, 503},
		{codes.DeadlineExceeded, 504},
		{codes.Internal, 500},
		{codes.Unknown, 500},
	} {
		f := newFake(t)
		f.fail("Encrypt", tc.code, "kms: "+tc.code.String())
		a := do(t, newHandler(t, f), http.MethodPost, "/v1/transit/encrypt/"+fakeKeyset, map[string]any{"plaintext": b64s("x")},
			transit.RequestIDHeader, "client-id-7")
		if a.code != tc.http || len(a.Errors) != 1 || a.Errors[0] != "kms: "+tc.code.String() {
			t.Errorf("backend %v: encrypt = %d %q, want %d %q", tc.code, a.code, a.Errors, tc.http, "kms: "+tc.code.String())
		}
		if got := a.header.Get(transit.RequestIDHeader); got != "audited-1" {
			t.Errorf("backend %v: X-Request-Id %q, want the audited ID audited-1", tc.code, got)
		}
	}
}

func TestHTTPStatus(t *testing.T) {
	for c, want := range map[codes.Code]int{
		codes.OK: 200, codes.InvalidArgument: 400, codes.FailedPrecondition: 400, codes.OutOfRange: 400, codes.NotFound: 400,
		codes.AlreadyExists: 400, codes.PermissionDenied: 403, codes.Unauthenticated: 401, codes.ResourceExhausted: 429,
		codes.Aborted: 409, codes.Unavailable: 503, codes.DeadlineExceeded: 504, codes.Canceled: 499, codes.Unimplemented: 501,
		codes.Internal: 500, codes.Unknown: 500, codes.DataLoss: 500, codes.Code(99): 500,
	} {
		if got := transit.HTTPStatus(c); got != want {
			t.Errorf("HTTPStatus(%v) = %d, want %d", c, got, want)
		}
	}
}

func TestBodyLimit(t *testing.T) {
	def := transit.Limits{MaxBatch: 1000, MaxPayload: 64 << 10, MaxCiphertext: 64<<10 + 45}
	uncapped := transit.BodyLimit(def)
	// A full batch of items whose plaintext and associated data (sent as
	// both fields) are at the limit must fit.
	item := base64.StdEncoding.EncodedLen(def.MaxCiphertext) + 2*base64.StdEncoding.EncodedLen(def.MaxPayload)
	if min := int64(def.MaxBatch * item); uncapped < min {
		t.Errorf("BodyLimit(%+v) = %d, want at least %d", def, uncapped, min)
	}
	def.MaxMessage = 64 << 20
	capped := transit.BodyLimit(def)
	if capped >= uncapped || capped < int64(base64.StdEncoding.EncodedLen(def.MaxMessage)) {
		t.Errorf("BodyLimit(%+v) = %d, want between the base64 of MaxMessage (%d) and %d", def, capped, base64.StdEncoding.EncodedLen(def.MaxMessage), uncapped)
	}
	one := transit.Limits{MaxBatch: 1000, MaxPayload: 64 << 10, MaxCiphertext: 64<<10 + 45, MaxMessage: 10}
	if got := transit.BodyLimit(one); got < int64(item) {
		t.Errorf("BodyLimit(%+v) = %d, want at least one item (%d)", one, got, item)
	}
}

func TestOptions(t *testing.T) {
	for _, tc := range []struct {
		opts transit.Options
		ok   bool
	}{
		{transit.Options{Limits: testLimits}, true},
		{transit.Options{Limits: testLimits, Mount: "kv/transit-2"}, true},
		{transit.Options{Limits: testLimits, Mount: "/transit"}, false},
		{transit.Options{Limits: testLimits, Mount: "a/../b"}, false},
		{transit.Options{Limits: testLimits, Mount: "tr ansit"}, false},
		{transit.Options{}, false},
	} {
		_, err := transit.NewHandler(newFake(t), tc.opts)
		if (err == nil) != tc.ok {
			t.Errorf("NewHandler(mount %q, limits %+v) = %v, want ok %v", tc.opts.Mount, tc.opts.Limits, err, tc.ok)
		}
	}
	h, err := transit.NewHandler(newFake(t), transit.Options{Limits: testLimits, Mount: "kv/tr"})
	if err != nil {
		t.Fatal(err)
	}
	if a := do(t, h, http.MethodGet, "/v1/kv/tr/keys/"+fakeKeyset, nil); a.code != 200 {
		t.Errorf("keys read under mount kv/tr = %d %v, want 200", a.code, a.Errors)
	}
}
