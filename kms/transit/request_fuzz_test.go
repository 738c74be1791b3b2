package transit

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"testing"
)

// FuzzDecodeRequest feeds arbitrary HTTP bodies to decode, the reader of
// every transit request (network input). It must never panic; it accepts
// only an empty body or one valid JSON value within the limit; it refuses
// a body over the limit as too large; and its errors stay short (they may
// quote at most 40 characters of a number field, never the body, which may
// hold a plaintext).
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		``, `{}`, `null`, `{"plaintext":"aGVsbG8="}`, `{"key_version":"3"}`, `{"key_version":1e3}`,
		`{"batch_input":[{"plaintext":"","context":"Yw=="}],"bits":"256"}`, `{"bits":"x"}`, `{} {}`, `[`,
		`{"ciphertext":"vault:v1:AAAA","nonce":"x"}`, `{"partial_failure_response_code":400}`,
	} {
		f.Add([]byte(s))
	}
	const limit = 512
	f.Fuzz(func(t *testing.T, body []byte) {
		req := httptest.NewRequest("POST", "/v1/transit/encrypt/k", bytes.NewReader(body))
		var r request
		err := decode(httptest.NewRecorder(), req, limit, &r)
		if len(body) > limit {
			if !errors.Is(err, errTooLarge) {
				t.Fatalf("decode(%d bytes, limit %d) error = %v, want errTooLarge", len(body), limit, err)
			}
			return
		}
		if err == nil {
			if len(bytes.TrimSpace(body)) != 0 && !json.Valid(body) {
				t.Fatalf("decode(%q) = nil, want an error for invalid JSON", body)
			}
			return
		}
		if n := len(err.Error()); n > 160 {
			t.Fatalf("decode(%q) error is %d bytes long (%q), want a short description that does not quote the body", body, n, err)
		}
	})
}
