package transit

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/keysets"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// HealthPath is Vault's health endpoint, served outside the mount.
const HealthPath = "/v1/sys/health"

// Handler serves the API over a Backend. Serve it only over TLS configured
// by identity.ServerTLSConfig: the Backend trusts the request's peer
// certificate as a verified X.509-SVID of the trust domain.
type Handler struct {
	b      Backend
	opts   Options
	prefix string // "/v1/<mount>/"
	limit  int64
}

// NewHandler returns the API's handler over b.
func NewHandler(b Backend, opts Options) (*Handler, error) {
	if b == nil {
		return nil, errors.New("transit: no backend")
	}
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	opts.setDefaults()
	return &Handler{b: b, opts: opts, prefix: "/v1/" + opts.Mount + "/", limit: BodyLimit(opts.Limits)}, nil
}

// BodyLimit is the largest request body the handler reads (see the
// package's BodyLimit); a larger one is refused with 413.
func (h *Handler) BodyLimit() int64 { return h.limit }

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	call := &Call{TLS: r.TLS, requestID: r.Header.Get(RequestIDHeader)}
	rw := &responder{w: w, call: call, log: h.opts.Logger, path: r.URL.Path}
	if r.URL.Path == HealthPath {
		h.health(rw, r)
		return
	}
	rest, ok := strings.CutPrefix(r.URL.Path, h.prefix)
	if !ok {
		rw.fail(http.StatusNotFound, "unsupported path")
		return
	}
	// Vault features that would change what the answer is: refused, not
	// ignored.
	if r.Header.Get("X-Vault-Wrap-TTL") != "" {
		rw.fail(http.StatusBadRequest, "response wrapping (X-Vault-Wrap-TTL) is not supported")
		return
	}
	if ns := strings.Trim(r.Header.Get("X-Vault-Namespace"), "/"); ns != "" && ns != "root" {
		rw.fail(http.StatusBadRequest, "namespaces (X-Vault-Namespace) are not supported: Cairn keysets are named by path, e.g. payments/ledger")
		return
	}
	ctx := WithCall(r.Context(), call)
	op, rest, _ := strings.Cut(rest, "/")
	kind := ""
	if op == "datakey" {
		kind, rest, _ = strings.Cut(rest, "/")
	}
	if rest == "" || !slices.Contains([]string{"encrypt", "decrypt", "rewrap", "datakey", "keys"}, op) {
		rw.fail(http.StatusNotFound, "unsupported path")
		return
	}
	if op == "keys" {
		if r.Method != http.MethodGet {
			rw.w.Header().Set("Allow", http.MethodGet)
			rw.fail(http.StatusMethodNotAllowed, "unsupported operation: keys are created, rotated and deleted with regionctl, not over the transit API")
			return
		}
	} else if r.Method != http.MethodPost && r.Method != http.MethodPut {
		rw.w.Header().Set("Allow", "POST, PUT")
		rw.fail(http.StatusMethodNotAllowed, "unsupported operation")
		return
	}
	name, err := keysetName(rest)
	if err != nil {
		rw.fail(http.StatusBadRequest, err.Error())
		return
	}
	if op == "keys" {
		h.readKey(ctx, rw, name)
		return
	}
	req := newRequest(h.opts.Limits.MaxBatch)
	if err := decode(w, r, h.limit, req); err != nil {
		if errors.Is(err, errTooLarge) {
			rw.fail(http.StatusRequestEntityTooLarge, err.Error())
			return
		}
		rw.fail(http.StatusBadRequest, err.Error())
		return
	}
	switch op {
	case "encrypt":
		h.encrypt(ctx, rw, name, req)
	case "decrypt":
		h.decrypt(ctx, rw, name, req)
	case "rewrap":
		h.rewrap(ctx, rw, name, req)
	case "datakey":
		h.datakey(ctx, rw, kind, name, req)
	}
}

// keysetName is the keyset a path names: everything after the operation,
// percent-decoded once more if it still holds '%' (see the package doc).
func keysetName(raw string) (string, error) {
	name := raw
	if strings.Contains(name, "%") {
		var err error
		if name, err = url.PathUnescape(name); err != nil {
			return "", fmt.Errorf("transit: keyset name %.128q: bad percent-encoding", raw)
		}
	}
	if err := keysets.ValidName(name); err != nil {
		return "", fmt.Errorf("transit: %v", err)
	}
	return name, nil
}

// encryptData is the data of an encrypt, rewrap or datakey answer.
type encryptData struct {
	Ciphertext string `json:"ciphertext"`
	KeyVersion uint32 `json:"key_version"`
	Plaintext  string `json:"plaintext,omitempty"` // datakey/plaintext only
}

// encryptResult is an item of an encrypt or rewrap batch_results.
type encryptResult struct {
	Ciphertext string  `json:"ciphertext,omitempty"`
	KeyVersion *uint32 `json:"key_version,omitempty"`
	Error      string  `json:"error,omitempty"`
	Reference  string  `json:"reference"`
}

// decryptData is the data of a decrypt answer.
type decryptData struct {
	Plaintext string `json:"plaintext"`
}

// decryptResult is an item of a decrypt batch_results (reference always
// present, as Vault writes it).
type decryptResult struct {
	Plaintext string `json:"plaintext"`
	Error     string `json:"error,omitempty"`
	Reference string `json:"reference"`
}

type batchData[T any] struct {
	BatchResults []T `json:"batch_results"`
}

func (h *Handler) encrypt(ctx context.Context, rw *responder, name string, req *request) {
	if req.BatchInput.set {
		h.encryptBatch(ctx, rw, name, req)
		return
	}
	if req.Plaintext == nil {
		rw.fail(http.StatusBadRequest, "missing plaintext to encrypt")
		return
	}
	pt, ad, version, err := req.encryptInput()
	defer clear(pt)
	if err != nil {
		rw.fail(http.StatusBadRequest, err.Error())
		return
	}
	resp, err := h.b.Encrypt(ctx, version, &kmsv1.EncryptRequest{Keyset: name, Plaintext: pt, AssociatedData: ad})
	if err != nil {
		rw.backendFail(err)
		return
	}
	ct, err := FormatCiphertext(resp.GetCiphertext())
	if err != nil {
		rw.internal(err)
		return
	}
	rw.ok(http.StatusOK, encryptData{Ciphertext: ct, KeyVersion: resp.GetKeyId()}, nil)
}

// encryptInput decodes an encrypt item: plaintext, associated data and
// key_version.
func (it *item) encryptInput() (pt, ad []byte, version uint32, err error) {
	if err := it.unsupported(); err != nil {
		return nil, nil, 0, err
	}
	if version, err = it.version(); err != nil {
		return nil, nil, 0, err
	}
	if ad, err = it.associatedData(); err != nil {
		return nil, nil, 0, err
	}
	p := ""
	if it.Plaintext != nil {
		p = *it.Plaintext
	}
	if pt, err = b64("plaintext", p); err != nil {
		return nil, nil, 0, err
	}
	return pt, ad, version, nil
}

// batchTally is what a batch's items came to, for its HTTP status.
type batchTally struct{ ok, user, internal bool }

// itemFailed counts an item's error of HTTP status code.
func (t *batchTally) itemFailed(code int) {
	if code >= 500 {
		t.internal = true
	} else {
		t.user = true
	}
}

// status is the HTTP status of an encrypt or decrypt batch, as Vault
// answers: 200 if every item succeeded; otherwise 400 if an item failed for
// the client's input, else 500; but partial_failure_response_code instead
// when some item succeeded (a value outside 200-599 is ignored with a
// warning).
func (t batchTally) status(partial jsonInt) (int, []string) {
	if !t.user && !t.internal {
		return http.StatusOK, nil
	}
	code := http.StatusInternalServerError
	if t.user {
		code = http.StatusBadRequest
	}
	if !partial.set || !t.ok {
		return code, nil
	}
	if partial.v < 200 || partial.v > 599 {
		return code, []string{fmt.Sprintf("invalid HTTP response code override from partial_failure_response_code, reverting to %d", code)}
	}
	return int(partial.v), nil
}

// checkBatch refuses an empty batch_input (an oversized one does not
// decode: see batchInput).
func (h *Handler) checkBatch(rw *responder, n int) bool {
	if n == 0 {
		rw.fail(http.StatusBadRequest, "missing batch input to process")
		return false
	}
	return true
}

func (h *Handler) encryptBatch(ctx context.Context, rw *responder, name string, req *request) {
	items := req.BatchInput.items
	if !h.checkBatch(rw, len(items)) {
		return
	}
	results := make([]encryptResult, len(items))
	in := make([]*kmsv1.EncryptItem, 0, len(items))
	at := make([]int, 0, len(items)) // in[j] is items[at[j]]
	defer func() {
		for _, it := range in {
			clear(it.Plaintext)
		}
	}()
	var tally batchTally
	var version uint32 // the one nonzero key_version the items name
	for i := range items {
		it := &items[i]
		results[i].Reference = it.Reference
		if it.Plaintext == nil {
			results[i].Error = "missing plaintext to encrypt"
			tally.user = true
			continue
		}
		pt, ad, v, err := it.encryptInput()
		if err != nil {
			clear(pt)
			results[i].Error = err.Error()
			tally.user = true
			continue
		}
		if v != 0 && version != 0 && v != version {
			clear(pt)
			rw.fail(http.StatusBadRequest, fmt.Sprintf("batch items name key versions %d and %d: Cairn encrypts only with the primary version; omit key_version or send 0", version, v))
			return
		}
		version = max(version, v)
		in = append(in, &kmsv1.EncryptItem{Plaintext: pt, AssociatedData: ad})
		at = append(at, i)
	}
	// The call is made even if no item is left: the keyset, the caller's
	// access and the audit record do not depend on the items.
	resp, err := h.b.EncryptBatch(ctx, version, &kmsv1.EncryptBatchRequest{Keyset: name, Items: in})
	if err != nil {
		rw.backendFail(err)
		return
	}
	if len(resp.GetResults()) != len(in) {
		rw.internal(fmt.Errorf("transit: EncryptBatch returned %d results for %d items", len(resp.GetResults()), len(in)))
		return
	}
	for j, res := range resp.GetResults() {
		i := at[j]
		if e := res.GetError(); e != nil {
			results[i].Error = e.GetMessage()
			tally.itemFailed(HTTPStatus(codes.Code(e.GetCode())))
			continue
		}
		ct, err := FormatCiphertext(res.GetOk().GetCiphertext())
		if err != nil {
			results[i].Error = err.Error()
			tally.internal = true
			continue
		}
		v := res.GetOk().GetKeyId()
		results[i].Ciphertext, results[i].KeyVersion = ct, &v
		tally.ok = true
	}
	code, warnings := tally.status(req.PartialFailureResponseCode)
	rw.ok(code, batchData[encryptResult]{results}, warnings)
}

func (h *Handler) decrypt(ctx context.Context, rw *responder, name string, req *request) {
	if req.BatchInput.set {
		h.decryptBatch(ctx, rw, name, req)
		return
	}
	ct, ad, err := req.decryptInput()
	if err != nil {
		rw.fail(http.StatusBadRequest, err.Error())
		return
	}
	resp, err := h.b.Decrypt(ctx, &kmsv1.DecryptRequest{Keyset: name, Ciphertext: ct, AssociatedData: ad})
	if err != nil {
		rw.backendFail(err)
		return
	}
	defer clear(resp.GetPlaintext())
	rw.ok(http.StatusOK, decryptData{Plaintext: base64.StdEncoding.EncodeToString(resp.GetPlaintext())}, nil)
}

// decryptInput decodes a decrypt or rewrap item: ciphertext and associated
// data.
func (it *item) decryptInput() (ct, ad []byte, err error) {
	if it.Ciphertext == "" {
		return nil, nil, errors.New("missing ciphertext to decrypt")
	}
	if err := it.unsupported(); err != nil {
		return nil, nil, err
	}
	if ct, _, err = ParseCiphertext(it.Ciphertext); err != nil {
		return nil, nil, err
	}
	if ad, err = it.associatedData(); err != nil {
		return nil, nil, err
	}
	return ct, ad, nil
}

func (h *Handler) decryptBatch(ctx context.Context, rw *responder, name string, req *request) {
	items := req.BatchInput.items
	if !h.checkBatch(rw, len(items)) {
		return
	}
	results := make([]decryptResult, len(items))
	in := make([]*kmsv1.DecryptItem, 0, len(items))
	at := make([]int, 0, len(items))
	var tally batchTally
	for i := range items {
		it := &items[i]
		results[i].Reference = it.Reference
		ct, ad, err := it.decryptInput()
		if err != nil {
			results[i].Error = err.Error()
			tally.user = true
			continue
		}
		in = append(in, &kmsv1.DecryptItem{Ciphertext: ct, AssociatedData: ad})
		at = append(at, i)
	}
	resp, err := h.b.DecryptBatch(ctx, &kmsv1.DecryptBatchRequest{Keyset: name, Items: in})
	if err != nil {
		rw.backendFail(err)
		return
	}
	defer func() {
		for _, res := range resp.GetResults() {
			clear(res.GetOk().GetPlaintext())
		}
	}()
	if len(resp.GetResults()) != len(in) {
		rw.internal(fmt.Errorf("transit: DecryptBatch returned %d results for %d items", len(resp.GetResults()), len(in)))
		return
	}
	for j, res := range resp.GetResults() {
		i := at[j]
		if e := res.GetError(); e != nil {
			results[i].Error = e.GetMessage()
			tally.itemFailed(HTTPStatus(codes.Code(e.GetCode())))
			continue
		}
		results[i].Plaintext = base64.StdEncoding.EncodeToString(res.GetOk().GetPlaintext())
		tally.ok = true
	}
	code, warnings := tally.status(req.PartialFailureResponseCode)
	rw.ok(code, batchData[decryptResult]{results}, warnings)
}

func (h *Handler) rewrap(ctx context.Context, rw *responder, name string, req *request) {
	if req.BatchInput.set {
		h.rewrapBatch(ctx, rw, name, req)
		return
	}
	r, err := req.rewrapInput(name)
	if err != nil {
		rw.fail(http.StatusBadRequest, err.Error())
		return
	}
	resp, err := h.b.Rewrap(ctx, r.version, r.req)
	if err != nil {
		rw.backendFail(err)
		return
	}
	ct, err := FormatCiphertext(resp.GetCiphertext())
	if err != nil {
		rw.internal(err)
		return
	}
	rw.ok(http.StatusOK, encryptData{Ciphertext: ct, KeyVersion: resp.GetKeyId()}, nil)
}

type rewrapInput struct {
	req     *kmsv1.RewrapRequest
	version uint32
}

func (it *item) rewrapInput(name string) (rewrapInput, error) {
	ct, ad, err := it.decryptInput()
	if err != nil {
		return rewrapInput{}, err
	}
	v, err := it.version()
	if err != nil {
		return rewrapInput{}, err
	}
	return rewrapInput{req: &kmsv1.RewrapRequest{Keyset: name, Ciphertext: ct, AssociatedData: ad}, version: v}, nil
}

// itemCodes are the errors a rewrap batch reports per item. Any other
// (unknown keyset, permission denied, not ready...) is the whole request's,
// as Vault fails the request for a missing key.
var itemCodes = []codes.Code{codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange}

// rewrapBatch rewraps the items one by one, each call audited on its own.
// As Vault, it answers 200 with the items' errors in batch_results.
func (h *Handler) rewrapBatch(ctx context.Context, rw *responder, name string, req *request) {
	items := req.BatchInput.items
	if !h.checkBatch(rw, len(items)) {
		return
	}
	results := make([]encryptResult, len(items))
	for i := range items {
		it := &items[i]
		results[i].Reference = it.Reference
		in, err := it.rewrapInput(name)
		if err != nil {
			results[i].Error = err.Error()
			continue
		}
		resp, err := h.b.Rewrap(ctx, in.version, in.req)
		if err != nil {
			if st := status.Convert(err); slices.Contains(itemCodes, st.Code()) {
				results[i].Error = st.Message()
				continue
			}
			rw.backendFail(err)
			return
		}
		ct, err := FormatCiphertext(resp.GetCiphertext())
		if err != nil {
			rw.internal(err)
			return
		}
		v := resp.GetKeyId()
		results[i].Ciphertext, results[i].KeyVersion = ct, &v
	}
	rw.ok(http.StatusOK, batchData[encryptResult]{results}, nil)
}

// dataKeyTemplates are the data keys datakey makes, by bits.
var dataKeyTemplates = map[int64]string{128: "AES128_GCM", 256: "AES256_GCM"}

func (h *Handler) datakey(ctx context.Context, rw *responder, kind, name string, req *request) {
	if kind != "plaintext" && kind != "wrapped" {
		rw.fail(http.StatusBadRequest, "Invalid path, must be 'plaintext' or 'wrapped'")
		return
	}
	bits := int64(256)
	if req.Bits.set {
		bits = req.Bits.v
	}
	template, ok := dataKeyTemplates[bits]
	switch {
	case bits == 512:
		rw.fail(http.StatusBadRequest, "bits 512: Cairn data keys are AES-128 or AES-256 keys; use bits 128 or 256")
		return
	case !ok:
		rw.fail(http.StatusBadRequest, "invalid bit length: use bits 128 or 256")
		return
	}
	if err := req.unsupported(); err != nil {
		rw.fail(http.StatusBadRequest, err.Error())
		return
	}
	version, err := req.version()
	if err != nil {
		rw.fail(http.StatusBadRequest, err.Error())
		return
	}
	ad, err := req.associatedData()
	if err != nil {
		rw.fail(http.StatusBadRequest, err.Error())
		return
	}
	resp, err := h.b.GenerateDataKey(ctx, version, &kmsv1.GenerateDataKeyRequest{
		Keyset: name, Template: template, Format: kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW, AssociatedData: ad})
	if err != nil {
		rw.backendFail(err)
		return
	}
	defer clear(resp.GetPlaintextKey())
	ct, err := FormatCiphertext(resp.GetWrappedKey())
	if err != nil {
		rw.internal(err)
		return
	}
	data := encryptData{Ciphertext: ct, KeyVersion: resp.GetKeyId()}
	if kind == "plaintext" {
		data.Plaintext = base64.StdEncoding.EncodeToString(resp.GetPlaintextKey())
	}
	rw.ok(http.StatusOK, data, nil)
}

// keyData is the data of a key read, in Vault's shape.
type keyData struct {
	Name                 string           `json:"name"`
	Type                 string           `json:"type"`
	Keys                 map[string]int64 `json:"keys"`
	LatestVersion        uint32           `json:"latest_version"`
	MinAvailableVersion  uint32           `json:"min_available_version"`
	MinDecryptionVersion uint32           `json:"min_decryption_version"`
	MinEncryptionVersion uint32           `json:"min_encryption_version"`
	DeletionAllowed      bool             `json:"deletion_allowed"`
	Derived              bool             `json:"derived"`
	Exportable           bool             `json:"exportable"`
	AllowPlaintextBackup bool             `json:"allow_plaintext_backup"`
	ImportedKey          bool             `json:"imported_key"`
	SupportsEncryption   bool             `json:"supports_encryption"`
	SupportsDecryption   bool             `json:"supports_decryption"`
	SupportsDerivation   bool             `json:"supports_derivation"`
	SupportsSigning      bool             `json:"supports_signing"`
}

// newKeyData describes k as Vault describes a key: keys maps each version
// that decrypts to the Unix time Cairn's record first knows of it (0 if
// unknown); latest_version is the primary; min_decryption_version is the
// numerically smallest version that decrypts (every version in keys is at
// least that, but as versions are random key IDs a larger number is not a
// newer version, nor one that decrypts); min_encryption_version is 0, and
// only latest_version encrypts.
func newKeyData(k *Key) keyData {
	d := keyData{Name: k.Name, Type: "unknown", Keys: make(map[string]int64, len(k.Versions)), LatestVersion: k.Primary,
		SupportsEncryption: true, SupportsDecryption: true}
	for i, v := range k.Versions {
		var since int64
		if !v.Since.IsZero() {
			since = v.Since.Unix()
		}
		d.Keys[strconv.FormatUint(uint64(v.ID), 10)] = since
		if i == 0 || v.ID < d.MinDecryptionVersion {
			d.MinDecryptionVersion = v.ID
		}
		if v.ID == k.Primary {
			d.Type = VaultType(v.Parameters)
		}
	}
	return d
}

func (h *Handler) readKey(ctx context.Context, rw *responder, name string) {
	k, err := h.b.ReadKey(ctx, name)
	if err != nil {
		if status.Code(err) == codes.NotFound {
			// Vault answers the read of a missing key with 404 and no error
			// text; the Vault client then returns (nil, nil).
			rw.fail(http.StatusNotFound)
			return
		}
		rw.backendFail(err)
		return
	}
	rw.ok(http.StatusOK, newKeyData(k), nil)
}

// healthData is sys/health's answer, in Vault's shape.
type healthData struct {
	Initialized                bool   `json:"initialized"`
	Sealed                     bool   `json:"sealed"`
	Standby                    bool   `json:"standby"`
	PerformanceStandby         bool   `json:"performance_standby"`
	ReplicationPerformanceMode string `json:"replication_performance_mode"`
	ReplicationDRMode          string `json:"replication_dr_mode"`
	ServerTimeUTC              int64  `json:"server_time_utc"`
	Version                    string `json:"version"`
	Enterprise                 bool   `json:"enterprise"`
}

// healthCodes are the query parameters of sys/health that choose a status,
// with their defaults; Cairn is always initialized and never a standby, so
// only activecode and sealedcode (not ready) are ever used, but each is
// checked as Vault checks it.
var healthCodes = []struct {
	param string
	def   int
}{
	{"activecode", http.StatusOK}, {"sealedcode", http.StatusServiceUnavailable},
	{"uninitcode", http.StatusNotImplemented}, {"standbycode", http.StatusTooManyRequests},
	{"drsecondarycode", 472}, {"performancestandbycode", 473}, {"removedcode", 530}, {"haunhealthycode", 474},
}

// health answers sys/health: 200 (activecode) while the KMS serves calls
// (Backend.Ready), 503 (sealedcode) with "sealed": true while it does not.
// It is not audited (a poll, like gRPC health checks).
func (h *Handler) health(rw *responder, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		rw.w.Header().Set("Allow", "GET, HEAD")
		rw.fail(http.StatusMethodNotAllowed, "unsupported operation")
		return
	}
	q := r.URL.Query()
	codeOf := map[string]int{}
	for _, c := range healthCodes {
		codeOf[c.param] = c.def
		if s := q.Get(c.param); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 200 || n > 599 {
				rw.fail(http.StatusBadRequest, fmt.Sprintf("bad code for %s: %.16q is not an HTTP status (200-599)", c.param, s))
				return
			}
			codeOf[c.param] = n
		}
	}
	ready := h.b.Ready()
	code := codeOf["activecode"]
	if !ready {
		code = codeOf["sealedcode"]
	}
	data := healthData{Initialized: true, Sealed: !ready, ReplicationPerformanceMode: "disabled", ReplicationDRMode: "disabled",
		ServerTimeUTC: h.opts.Now().Unix(), Version: h.opts.Version}
	if r.Method == http.MethodHead {
		rw.w.WriteHeader(code)
		return
	}
	rw.writeJSON(code, data)
}

// responder writes one request's answer.
type responder struct {
	w    http.ResponseWriter
	call *Call
	log  *slog.Logger
	path string
}

// envelope is Vault's answer around data.
type envelope struct {
	RequestID     string    `json:"request_id"`
	LeaseID       string    `json:"lease_id"`
	Renewable     bool      `json:"renewable"`
	LeaseDuration int       `json:"lease_duration"`
	Data          any       `json:"data"`
	WrapInfo      *struct{} `json:"wrap_info"`
	Warnings      []string  `json:"warnings"`
	Auth          *struct{} `json:"auth"`
	MountType     string    `json:"mount_type"`
}

// ok answers data in Vault's envelope with status code (an error status is
// a batch with failed items: the request ID goes in the header too).
func (rw *responder) ok(code int, data any, warnings []string) {
	if code >= 400 {
		rw.setRequestID()
	}
	rw.writeJSON(code, envelope{RequestID: rw.auditedID(), Data: data, Warnings: warnings, MountType: "transit"})
}

// errorBody is Vault's error answer.
type errorBody struct {
	Errors []string `json:"errors"`
}

// fail answers an error with msgs.
func (rw *responder) fail(code int, msgs ...string) {
	rw.setRequestID()
	if msgs == nil {
		msgs = []string{}
	}
	rw.writeJSON(code, errorBody{Errors: msgs})
}

// backendFail answers a Backend error with the status HTTPStatus gives its
// code, and logs server-side failures.
func (rw *responder) backendFail(err error) {
	st := status.Convert(err)
	code := HTTPStatus(st.Code())
	if code >= 500 && code != 503 {
		rw.log.Warn("transit: request failed", "path", rw.path, "status", code, "code", st.Code().String(), "request_id", rw.auditedID(), "err", st.Message())
	}
	rw.fail(code, st.Message())
}

// internal answers 500 for a bug of this adapter or the KMS.
func (rw *responder) internal(err error) {
	rw.log.Error("transit: internal error", "path", rw.path, "request_id", rw.auditedID(), "err", err)
	rw.fail(http.StatusInternalServerError, "internal error")
}

// setRequestID puts the ID the call was audited under in the response
// header; a request refused before any Backend call was not audited and
// gets none.
func (rw *responder) setRequestID() {
	if id := rw.auditedID(); id != "" {
		rw.w.Header().Set(RequestIDHeader, id)
	}
}

// auditedID is the ID a Backend call of the request was audited under, or
// "" if none was (the client's header is not echoed unchecked).
func (rw *responder) auditedID() string {
	if rw.call.audited {
		return rw.call.requestID
	}
	return ""
}

// writeJSON writes v with status code and then wipes the encoding, which
// may hold a plaintext.
func (rw *responder) writeJSON(code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		rw.log.Error("transit: encoding the answer", "path", rw.path, "err", err)
		code, b = http.StatusInternalServerError, []byte(`{"errors":["internal error"]}`)
	}
	h := rw.w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", strconv.Itoa(len(b)+1))
	b = append(b, '\n')
	rw.w.WriteHeader(code)
	_, _ = rw.w.Write(b)
	clear(b)
}
