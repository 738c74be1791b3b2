package transit

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
)

// jsonInt is an integer field as Vault reads one: a JSON number or a string
// of one (the vault CLI sends every value as a string).
type jsonInt struct {
	set bool
	v   int64
}

func (n *jsonInt) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*n = jsonInt{}
		return nil
	}
	s := string(b)
	if len(b) > 0 && b[0] == '"' {
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("%.40q is not an integer", s)
	}
	*n = jsonInt{set: true, v: v}
	return nil
}

// keyVersion is a key_version field: 0 (the primary) if absent.
func (n jsonInt) keyVersion() (uint32, error) {
	if n.v < 0 || n.v > math.MaxUint32 {
		return 0, fmt.Errorf("key_version %d is not a key version (0, or a 32-bit key ID)", n.v)
	}
	return uint32(n.v), nil
}

// item is one encrypt, decrypt or rewrap input: the top-level fields of a
// single call, or one element of batch_input.
type item struct {
	Plaintext      *string `json:"plaintext"`
	Ciphertext     string  `json:"ciphertext"`
	AssociatedData string  `json:"associated_data"`
	Context        string  `json:"context"`
	KeyVersion     jsonInt `json:"key_version"`
	Reference      string  `json:"reference"`
	// Fields Cairn refuses rather than ignore: they would change what Vault
	// does.
	Nonce         string `json:"nonce"`
	IV            string `json:"iv"`
	PaddingScheme string `json:"padding_scheme"`
}

// request is the body of encrypt, decrypt, rewrap and datakey. Make one
// with newRequest.
type request struct {
	item
	BatchInput                 batchInput `json:"batch_input"`
	PartialFailureResponseCode jsonInt    `json:"partial_failure_response_code"`
	Bits                       jsonInt    `json:"bits"`
}

// newRequest is a request to decode, taking at most maxBatch items in
// batch_input.
func newRequest(maxBatch int) *request {
	return &request{BatchInput: batchInput{max: maxBatch}}
}

// batchInput is batch_input: set if present and not null. Its items are
// decoded one by one, and the first past max refuses the body: decoded
// whole, a body of empty items ("[{},{},...]", 3 bytes each) would become
// an item of over a hundred bytes per 3 before anything counted them, or
// even knew the caller.
type batchInput struct {
	max   int
	set   bool
	items []item
}

// errBatchTooLarge is a batch_input of more than the limit's items (400).
type errBatchTooLarge struct{ max int }

func (e *errBatchTooLarge) Error() string {
	return fmt.Sprintf("batch_input has more than the limit of %d items", e.max)
}

func (in *batchInput) UnmarshalJSON(b []byte) error {
	in.set, in.items = false, nil
	switch {
	case string(b) == "null":
		return nil
	case len(b) == 0 || b[0] != '[':
		// Not a list: no items to count, and json's error, as before.
		var items []item
		return json.Unmarshal(b, &items)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if _, err := dec.Token(); err != nil { // '[': json checked the syntax
		return err
	}
	for dec.More() {
		if len(in.items) == in.max {
			in.items = nil
			return &errBatchTooLarge{max: in.max}
		}
		in.items = append(in.items, item{})
		if err := dec.Decode(&in.items[len(in.items)-1]); err != nil {
			return err
		}
	}
	in.set = true
	return nil
}

// errTooLarge is a body over the limit (413).
var errTooLarge = errors.New("http: request body too large")

// decode reads the JSON object of r's body, at most limit bytes, into dst.
// An empty body is an empty object, as Vault reads it.
func decode(w http.ResponseWriter, r *http.Request, limit int64, dst any) error {
	if r.ContentLength > limit {
		return errTooLarge
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	err := dec.Decode(dst)
	if err == nil {
		if _, err = dec.Token(); err == io.EOF {
			return nil
		} else if err == nil {
			return errors.New("failed to parse JSON input: data after the JSON object")
		}
	}
	var tooLarge *http.MaxBytesError
	var tooMany *errBatchTooLarge
	switch {
	case errors.Is(err, io.EOF):
		return nil // an empty body
	case errors.As(err, &tooLarge):
		return errTooLarge
	case errors.As(err, &tooMany):
		return err
	}
	return fmt.Errorf("failed to parse JSON input: %v", jsonError(err))
}

// jsonError describes a decoding error without quoting the input (which may
// be a plaintext).
func jsonError(err error) string {
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case errors.As(err, &typeErr):
		if typeErr.Field != "" {
			// The embedded item's fields are the request's own.
			field := strings.ReplaceAll(typeErr.Field, "item.", "")
			return fmt.Sprintf("field %s: want %s, got a JSON %s", field, typeErr.Type, typeErr.Value)
		}
		return fmt.Sprintf("want a JSON object, got a JSON %s", typeErr.Value)
	case errors.As(err, &syntaxErr):
		return fmt.Sprintf("syntax error at byte %d", syntaxErr.Offset)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "unexpected end of input"
	}
	// jsonInt's own errors, which quote at most 40 characters of a field
	// that should have been a number.
	return err.Error()
}

// b64 decodes a base64 field (standard encoding, as Vault's).
func b64(field, s string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%s is not valid base64", field)
	}
	return b, nil
}

// associatedData is the item's associated data: associated_data or context
// (they are the same thing; if both are given they must be equal).
func (it *item) associatedData() ([]byte, error) {
	ad, err := b64("associated_data", it.AssociatedData)
	if err != nil {
		return nil, err
	}
	c, err := b64("context", it.Context)
	if err != nil {
		return nil, err
	}
	switch {
	case len(c) == 0:
		return ad, nil
	case len(ad) == 0:
		return c, nil
	case bytes.Equal(ad, c):
		return ad, nil
	}
	return nil, errors.New("associated_data and context differ: both are Cairn's associated data; send one, or the same value in both")
}

// unsupported refuses the fields that select Vault features Cairn keys do
// not have.
func (it *item) unsupported() error {
	switch {
	case it.Nonce != "":
		return errors.New("nonce is not supported: Cairn keys are not convergent, every encryption draws its own nonce")
	case it.IV != "":
		return errors.New("iv is not supported: Cairn keys are AEADs, not AES-CBC")
	case it.PaddingScheme != "":
		return errors.New("padding_scheme is not supported: Cairn keys are AEADs, not RSA")
	}
	return nil
}

// version is the item's key_version (0: the primary).
func (it *item) version() (uint32, error) { return it.KeyVersion.keyVersion() }
