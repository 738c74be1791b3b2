package rootkms

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/lifecycle"
	"github.com/cairnkms/cairn/internal/safety"
	"github.com/cairnkms/cairn/internal/secret"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkey"
)

// The root KMS is the system of record for customer keysets: each keyset's
// policy, the lifecycle of every version, and its copies, one per region,
// encrypted under that region's master key. Every lifecycle step is made
// here: the leader decrypts the copies, changes the keyset with Tink's
// manager, re-encrypts a copy per region and proposes the step together
// with the new copies, so the record and the copies never disagree. A
// version added (the first at creation, or by ADD_VERSION) gets its golden
// ciphertext (golden.go) in the same command. Steps that could make a
// ciphertext undecryptable (promote, disable) are first checked against the
// Safety Condition (internal/safety) with the record's own propagation and
// usage observations.

// keysetProto is the API view of a record; copies are left out unless asked.
func keysetProto(r *statev1.KeysetRecord, withCopies bool, index uint64) *rootkmsv1.Keyset {
	if !withCopies && len(r.GetCopies()) > 0 {
		r = fsm.KeysetWithoutCopies(r) // shares r's nested messages: the answer is only marshalled
	}
	return &rootkmsv1.Keyset{Record: r, CommitIndex: index}
}

// withWindow adds the Safety Condition window regionctl judges with.
func (s *Server) withWindow(k *rootkmsv1.Keyset) *rootkmsv1.Keyset {
	k.PropagationWindow = durationpb.New(s.cfg.Safety.Window)
	return k
}

// CreateKeyset implements RootKMS: the keyset is made here, recorded, and
// leaves only encrypted under each region's primary key.
func (s *Server) CreateKeyset(ctx context.Context, req *rootkmsv1.CreateKeysetRequest) (*rootkmsv1.Keyset, error) {
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	name := req.GetName()
	if err := keysets.ValidName(name); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	audit.AddTarget(ctx, audit.Target{Keyset: name})
	regions := slices.Sorted(slices.Values(req.GetRegions()))
	switch {
	case len(regions) == 0:
		return nil, status.Error(codes.InvalidArgument, "rootkms: a keyset needs at least one region")
	case len(slices.Compact(slices.Clone(regions))) != len(regions):
		return nil, status.Error(codes.InvalidArgument, "rootkms: a region is listed twice")
	}
	ttl, err := positiveDuration("ciphertext_ttl", req.GetCiphertextTtl(), true)
	if err != nil {
		return nil, err
	}
	rotation, err := positiveDuration("rotation_period", req.GetRotationPeriod(), false)
	if err != nil {
		return nil, err
	}
	template := req.GetTemplate()
	if template == "" {
		template = keysets.DefaultTemplate
	}
	h, err := keysets.Generate(template)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_CreateKeyset{CreateKeyset: &statev1.CreateKeysetCommand{Keyset: &statev1.KeysetRecord{Name: name}}}}); dup != nil || err != nil {
		return s.keysetAnswer(dup, err, true)
	}
	st := s.fsm.State()
	if _, ok := st.Keyset(name); ok {
		return nil, status.Errorf(codes.AlreadyExists, "rootkms: keyset %q exists; a keyset name is never reused (rotate it instead)", name)
	}
	copies, err := s.encryptCopies(key, st, h, name, regions, nil)
	if err != nil {
		return nil, err
	}
	primary := h.KeysetInfo().GetPrimaryKeyId()
	golden, err := makeGolden(h, name, primary)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	first := &statev1.KeysetVersionRecord{KeyId: primary, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY, Template: template, Golden: golden}
	caller, _ := identity.FromContext(ctx)
	rec := &statev1.KeysetRecord{
		Name:           name,
		Regions:        regions,
		CreatedBy:      caller.String(),
		RotationPeriod: durationpb.New(rotation),
		TtlHistory:     []*statev1.TtlPeriod{{Ttl: durationpb.New(ttl)}},
		Versions:       []*statev1.KeysetVersionRecord{first},
		Copies:         copies,
		Revision:       1,
		Purpose:        uint32(bundlev1.Purpose_PURPOSE_ENVELOPE),
	}
	res, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_CreateKeyset{CreateKeyset: &statev1.CreateKeysetCommand{Keyset: rec}}})
	if err != nil {
		return nil, err
	}
	audit.AddTarget(ctx, audit.Target{KeyVersion: primary})
	return s.keysetAnswer(res, nil, true)
}

// keysetAnswer turns an apply result (or a replayed one) into the API answer.
func (s *Server) keysetAnswer(res *fsm.Result, err error, withCopies bool) (*rootkmsv1.Keyset, error) {
	if err != nil {
		return nil, err
	}
	if res == nil || res.Keyset == nil {
		return nil, status.Error(codes.Internal, "rootkms: the write was applied but its keyset is gone")
	}
	return s.withWindow(keysetProto(res.Keyset, withCopies, s.fsm.State().Index())), nil
}

// positiveDuration checks an API duration: valid, not negative, and non-zero
// if required.
func positiveDuration(field string, d *durationpb.Duration, required bool) (time.Duration, error) {
	if d == nil {
		if required {
			return 0, status.Errorf(codes.InvalidArgument, "rootkms: %s is required", field)
		}
		return 0, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, status.Errorf(codes.InvalidArgument, "rootkms: %s: %v", field, err)
	}
	v := d.AsDuration()
	if v < 0 || (required && v == 0) {
		return 0, status.Errorf(codes.InvalidArgument, "rootkms: %s must be positive, got %v", field, v)
	}
	return v, nil
}

// encryptCopies encrypts h for every region, under the region key version
// version(region) picks (nil: the region's primary).
func (s *Server) encryptCopies(key *rootkey.Key, st *fsm.State, h *keyset.Handle, name string, regions []string, version func(region string) uint32) ([]*cryptov1.EncryptedKeyset, error) {
	out := make([]*cryptov1.EncryptedKeyset, 0, len(regions))
	for _, region := range regions {
		r, ok := st.Region(region)
		if !ok {
			return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", region)
		}
		var v uint32
		if version != nil {
			v = version(region)
		}
		if v == 0 {
			p, ok := r.Primary()
			if !ok {
				return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q has no primary key version", region)
			}
			v = p.Version
		}
		ek, err := s.encryptFor(key, st, h, name, region, v)
		if err != nil {
			return nil, err
		}
		out = append(out, ek)
	}
	return out, nil
}

// GetKeyset implements RootKMS (linearizable: via the leader).
func (s *Server) GetKeyset(ctx context.Context, req *rootkmsv1.GetKeysetRequest) (*rootkmsv1.Keyset, error) {
	audit.AddTarget(ctx, audit.Target{Keyset: req.GetName()})
	if err := s.linearize(); err != nil {
		return nil, err
	}
	st := s.fsm.State()
	r, ok := st.Keyset(req.GetName())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no keyset %q", req.GetName())
	}
	return s.withWindow(keysetProto(r, req.GetIncludeCopies(), st.Index())), nil
}

// ListKeysets implements RootKMS (linearizable: via the leader).
func (s *Server) ListKeysets(ctx context.Context, req *rootkmsv1.ListKeysetsRequest) (*rootkmsv1.ListKeysetsResponse, error) {
	if err := s.linearize(); err != nil {
		return nil, err
	}
	st := s.fsm.State()
	if req.GetRegion() != "" {
		if _, ok := st.Region(req.GetRegion()); !ok {
			return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", req.GetRegion())
		}
	}
	size := int(req.GetPageSize())
	switch {
	case size == 0:
		size = DefaultListPageSize
	case size > MaxListPageSize:
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: page_size %d is above %d", size, MaxListPageSize)
	}
	out := &rootkmsv1.ListKeysetsResponse{CommitIndex: st.Index(), PropagationWindow: durationpb.New(s.cfg.Safety.Window)}
	all := st.Keysets() // sorted by name
	// Resume after the token's name (a keyset may have been created since).
	start, _ := slices.BinarySearchFunc(all, req.GetPageToken(), func(r *statev1.KeysetRecord, name string) int { return strings.Compare(r.GetName(), name) })
	if start < len(all) && req.GetPageToken() != "" && all[start].GetName() == req.GetPageToken() {
		start++
	}
	bytes := 0
	for _, r := range all[start:] {
		if req.GetRegion() != "" && !slices.Contains(r.GetRegions(), req.GetRegion()) {
			continue
		}
		k := keysetProto(r, req.GetIncludeCopies(), st.Index())
		// Stop at the page size, or before the answer outgrows half the
		// message limit; the next page starts after the last one listed.
		n := proto.Size(k)
		if len(out.Keysets) == size || (len(out.Keysets) > 0 && bytes+n > MaxMessageSize/2) {
			out.NextPageToken = out.Keysets[len(out.Keysets)-1].GetRecord().GetName()
			break
		}
		bytes += n
		out.Keysets = append(out.Keysets, k)
	}
	return out, nil
}

// ListKeysets pages: DefaultListPageSize keysets unless the request asks for
// another size, at most MaxListPageSize, and never more than half the
// message limit in bytes.
const (
	DefaultListPageSize = 1000
	MaxListPageSize     = 10000
)

// DefaultDestroyDelay is how long a scheduled destruction waits (and can be
// undone) unless the request says otherwise.
const DefaultDestroyDelay = 24 * time.Hour

// UpdateKeyset implements RootKMS: one lifecycle step, checked against the
// Safety Condition where it could lose data.
func (s *Server) UpdateKeyset(ctx context.Context, req *rootkmsv1.UpdateKeysetRequest) (*rootkmsv1.Keyset, error) {
	key, err := s.rootKey()
	if err != nil {
		return nil, err
	}
	step := req.GetStep()
	audit.AddTarget(ctx, audit.Target{Keyset: req.GetName(), KeyVersion: req.GetKeyId(), Resource: "step " + stepName(step)})
	var tmpl string
	switch step {
	case statev1.KeysetStep_KEYSET_STEP_ADD_VERSION:
		tmpl = req.GetTemplate()
		if tmpl == "" {
			tmpl = keysets.DefaultTemplate
		}
		if _, err := keysets.Template(tmpl); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
	case statev1.KeysetStep_KEYSET_STEP_REWRAP:
	case statev1.KeysetStep_KEYSET_STEP_PROMOTE, statev1.KeysetStep_KEYSET_STEP_DISABLE, statev1.KeysetStep_KEYSET_STEP_ENABLE,
		statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, statev1.KeysetStep_KEYSET_STEP_UNDESTROY, statev1.KeysetStep_KEYSET_STEP_DESTROY:
		if req.GetKeyId() == 0 {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: step %s needs a key_id", stepName(step))
		}
	default:
		return nil, status.Errorf(codes.InvalidArgument, "rootkms: unknown keyset step %v", step)
	}
	delay := DefaultDestroyDelay
	if d := req.GetDestroyDelay(); d != nil {
		// Required positive: a zero delay would leave no time to undo.
		if delay, err = positiveDuration("destroy_delay", d, true); err != nil {
			return nil, err
		}
	}

	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_UpdateKeyset{UpdateKeyset: &statev1.UpdateKeysetCommand{
		Name: req.GetName(), Step: step, KeyId: req.GetKeyId()}}}); dup != nil || err != nil {
		return s.keysetAnswer(dup, err, false)
	}
	st := s.fsm.State()
	rec, ok := st.Keyset(req.GetName())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no keyset %q", req.GetName())
	}
	if rev := req.GetExpectedRevision(); rev != 0 && rev != rec.GetRevision() {
		return nil, status.Errorf(codes.Aborted, "rootkms: keyset %q is at revision %d, not %d: someone else changed it; read it again", rec.GetName(), rec.GetRevision(), rev)
	}
	if step != statev1.KeysetStep_KEYSET_STEP_ADD_VERSION && step != statev1.KeysetStep_KEYSET_STEP_REWRAP {
		v := recordVersion(rec, req.GetKeyId())
		switch {
		case v == nil:
			return nil, status.Errorf(codes.NotFound, "rootkms: keyset %q has no version %d", rec.GetName(), req.GetKeyId())
		case step == statev1.KeysetStep_KEYSET_STEP_PROMOTE && v.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY:
			return s.withWindow(keysetProto(rec, false, st.Index())), nil // already primary: nothing to do
		}
	}
	now := s.cfg.Now()
	if err := s.checkClock(st, step, now); err != nil {
		return nil, err
	}
	if err := s.checkStep(rec, step, req.GetKeyId(), now); err != nil {
		return nil, err
	}
	// Last, as it costs a round trip to the other voters: a step the
	// record's own evidence refuses needs no clocks confirmed.
	if timeJudged(step) {
		if err := s.checkClockQuorum(ctx, stepName(step)); err != nil {
			return nil, err
		}
	}
	h, err := s.openRecord(key, st, rec)
	if err != nil {
		return nil, err
	}
	cmd := &statev1.UpdateKeysetCommand{Name: rec.GetName(), ExpectedRevision: rec.GetRevision(), Step: step, KeyId: req.GetKeyId()}
	m := keyset.NewManagerFromHandle(h)
	var keyVersion func(region string) uint32 = copyVersion(rec) // REWRAP: nil (each region's primary)
	switch step {
	case statev1.KeysetStep_KEYSET_STEP_ADD_VERSION:
		t, _ := keysets.Template(tmpl)
		id, err := m.Add(t)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "rootkms: adding a key: %v", err)
		}
		cmd.KeyId, cmd.Template = id, tmpl
	case statev1.KeysetStep_KEYSET_STEP_PROMOTE:
		err = m.SetPrimary(req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_DISABLE:
		err = m.Disable(req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_ENABLE:
		err = m.Enable(req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY:
		cmd.DestroyAfter = timestamppb.New(now.Add(delay))
	case statev1.KeysetStep_KEYSET_STEP_UNDESTROY:
	case statev1.KeysetStep_KEYSET_STEP_DESTROY:
		err = m.Delete(req.GetKeyId())
	case statev1.KeysetStep_KEYSET_STEP_REWRAP:
		keyVersion = nil
	}
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: keyset %q key %d: %s: %v", rec.GetName(), req.GetKeyId(), stepName(step), err)
	}
	nh, err := m.Handle()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "rootkms: %v", err)
	}
	if step == statev1.KeysetStep_KEYSET_STEP_ADD_VERSION {
		if cmd.Golden, err = makeGolden(nh, rec.GetName(), cmd.KeyId); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	if cmd.Copies, err = s.encryptCopies(key, st, nh, rec.GetName(), rec.GetRegions(), keyVersion); err != nil {
		return nil, err
	}
	res, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_UpdateKeyset{UpdateKeyset: cmd}})
	if err != nil {
		return nil, err
	}
	if cmd.KeyId != 0 {
		audit.AddTarget(ctx, audit.Target{KeyVersion: cmd.KeyId})
	}
	return s.keysetAnswer(res, nil, false)
}

// copyVersion keeps every copy under the region key version it is under.
func copyVersion(rec *statev1.KeysetRecord) func(region string) uint32 {
	return func(region string) uint32 {
		for _, c := range rec.GetCopies() {
			if c.GetRegion() == region {
				return c.GetRegionKeyVersion()
			}
		}
		return 0
	}
}

// openRecord decrypts every copy of a recorded keyset and checks they hold
// the same keys.
func (s *Server) openRecord(key *rootkey.Key, st *fsm.State, rec *statev1.KeysetRecord) (*keyset.Handle, error) {
	h, err := s.openCopies(key, st, rec.GetCopies())
	if err != nil {
		// The record is the leader's own; a copy that does not open is
		// damage, not a caller's mistake.
		return nil, status.Errorf(codes.Internal, "rootkms: keyset %q: the recorded copies do not open: %v", rec.GetName(), status.Convert(err).Message())
	}
	return h, nil
}

func stepName(s statev1.KeysetStep) string {
	if n, ok := statev1.KeysetStep_name[int32(s)]; ok && s != 0 {
		return n[len("KEYSET_STEP_"):]
	}
	return fmt.Sprintf("step(%d)", int32(s))
}

// SetKeysetPolicy implements RootKMS.
func (s *Server) SetKeysetPolicy(ctx context.Context, req *rootkmsv1.SetKeysetPolicyRequest) (*rootkmsv1.Keyset, error) {
	audit.AddTarget(ctx, audit.Target{Keyset: req.GetName()})
	if req.GetRotationPeriod() == nil && req.GetCiphertextTtl() == nil {
		return nil, status.Error(codes.InvalidArgument, "rootkms: nothing to change: give a rotation_period or a ciphertext_ttl")
	}
	if _, err := positiveDuration("rotation_period", req.GetRotationPeriod(), false); err != nil {
		return nil, err
	}
	if req.GetCiphertextTtl() != nil {
		if _, err := positiveDuration("ciphertext_ttl", req.GetCiphertextTtl(), true); err != nil {
			return nil, err
		}
	}
	if _, err := s.rootKey(); err != nil {
		return nil, err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_SetKeysetPolicy{SetKeysetPolicy: &statev1.SetKeysetPolicyCommand{Name: req.GetName()}}}); dup != nil || err != nil {
		return s.keysetAnswer(dup, err, false)
	}
	rec, ok := s.fsm.State().Keyset(req.GetName())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no keyset %q", req.GetName())
	}
	if rev := req.GetExpectedRevision(); rev != 0 && rev != rec.GetRevision() {
		return nil, status.Errorf(codes.Aborted, "rootkms: keyset %q is at revision %d, not %d: someone else changed it; read it again", rec.GetName(), rec.GetRevision(), rev)
	}
	res, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_SetKeysetPolicy{SetKeysetPolicy: &statev1.SetKeysetPolicyCommand{
		Name: rec.GetName(), ExpectedRevision: rec.GetRevision(), RotationPeriod: req.GetRotationPeriod(), CiphertextTtl: req.GetCiphertextTtl()}}})
	return s.keysetAnswer(res, err, false)
}

// RecordPropagation implements RootKMS.
func (s *Server) RecordPropagation(ctx context.Context, req *rootkmsv1.RecordPropagationRequest) (*rootkmsv1.RecordPropagationResponse, error) {
	audit.AddTarget(ctx, audit.Target{Region: req.GetRegion()})
	if len(req.GetRegionKeyVersions()) == 0 && len(req.GetKeysets()) > 0 {
		return nil, status.Error(codes.InvalidArgument, "rootkms: an observation of keysets must list the region key versions the region's servers need (from KMSAdmin.GetStatus); none would let every old region key version retire")
	}
	if _, err := s.rootKey(); err != nil {
		return nil, err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_RecordPropagation{RecordPropagation: &statev1.RecordPropagationCommand{Region: req.GetRegion()}}}); dup != nil || err != nil {
		if err != nil {
			return nil, err
		}
		return &rootkmsv1.RecordPropagationResponse{CommitIndex: s.fsm.State().Index()}, nil
	}
	if _, ok := s.fsm.State().Region(req.GetRegion()); !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", req.GetRegion())
	}
	if _, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_RecordPropagation{RecordPropagation: &statev1.RecordPropagationCommand{
		Region: req.GetRegion(), Keysets: req.GetKeysets(), RegionKeyVersions: req.GetRegionKeyVersions()}}}); err != nil {
		return nil, err
	}
	return &rootkmsv1.RecordPropagationResponse{CommitIndex: s.fsm.State().Index()}, nil
}

// RetireRegionKeyVersion implements RootKMS: an old region key version is
// disabled once nothing needs it.
func (s *Server) RetireRegionKeyVersion(ctx context.Context, req *rootkmsv1.RetireRegionKeyVersionRequest) (*rootkmsv1.Region, error) {
	audit.AddTarget(ctx, audit.Target{Region: req.GetRegion(), KeyVersion: req.GetVersion()})
	if _, err := s.rootKey(); err != nil {
		return nil, err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if dup, err := s.beginWrite(ctx, &statev1.Command{Op: &statev1.Command_SetRegionKeyVersionStatus{SetRegionKeyVersionStatus: &statev1.SetRegionKeyVersionStatusCommand{
		Region: req.GetRegion(), Version: req.GetVersion()}}}); dup != nil || err != nil {
		return s.regionWriteAnswer(dup, err)
	}
	st := s.fsm.State()
	r, ok := st.Region(req.GetRegion())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", req.GetRegion())
	}
	v, ok := r.Version(req.GetVersion())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: region %q has no key version %d", r.Name, req.GetVersion())
	}
	if v.Status == cryptov1.KeyStatus_KEY_STATUS_PRIMARY {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q key version %d is primary: rotate the region key first", r.Name, v.Version)
	}
	var users []string
	for _, k := range st.Keysets() {
		for _, c := range k.GetCopies() {
			if c.GetRegion() == r.Name && c.GetRegionKeyVersion() == v.Version {
				users = append(users, k.GetName())
			}
		}
	}
	if len(users) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q key version %d still encrypts the copies of %d keyset(s) (%s): rewrap them first (regionctl keyset rewrap)",
			r.Name, v.Version, len(users), listSome(users))
	}
	if r.ServedObservedAt.IsZero() {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q key version %d: what the region's KMS servers serve was never observed; push a rewrapped bundle and run `regionctl observe` first", r.Name, v.Version)
	}
	observed := r.ServedObservedAt.UTC().Format(time.RFC3339)
	if slices.Contains(r.ServedKeyVersions, v.Version) {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q key version %d: the region's KMS servers were last seen (%s) serving a bundle that needs it; roll out a bundle with the rewrapped keysets first",
			r.Name, v.Version, observed)
	}
	// An observation that does not list the version proves nothing about
	// bundles it did not see: ones pushed since (a server restarting on its
	// persisted bundle must still unwrap it), and ones built while the
	// version was primary, which encrypted the copies under it. So it must
	// be as recent as the keysets' usage observations must be (see
	// observedFleet), and later than the version's creation and its last
	// supersession. Times that tie cannot be ordered (the FSM clamps a slow
	// leader's command time to the record's latest): a tie is refused, and
	// a later observation settles it.
	if maxAge, now := s.cfg.Safety.ObservationMaxAge, s.cfg.Now(); r.ServedObservedAt.Add(maxAge).Before(now) {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q key version %d: what the region's KMS servers serve was last observed at %s, more than %v ago; run `regionctl observe` first",
			r.Name, v.Version, observed, maxAge)
	}
	since := v.CreatedAt
	if v.SupersededAt.After(since) {
		since = v.SupersededAt
	}
	if !r.ServedObservedAt.After(since) {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q key version %d: what the region's KMS servers serve was last observed at %s, not after the version was created or last superseded (%s): bundles that need it may not have been seen; run `regionctl observe` first",
			r.Name, v.Version, observed, since.UTC().Format(time.RFC3339))
	}
	res, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_SetRegionKeyVersionStatus{SetRegionKeyVersionStatus: &statev1.SetRegionKeyVersionStatusCommand{
		Region: r.Name, Version: v.Version, Status: cryptov1.KeyStatus_KEY_STATUS_DISABLED}}})
	return s.regionWriteAnswer(res, err)
}

// listSome lists up to five names.
func listSome(names []string) string {
	if len(names) <= 5 {
		return fmt.Sprint(names)
	}
	return fmt.Sprintf("%v and %d more", names[:5], len(names)-5)
}

// checkStep runs the Safety Condition on a step that could make a
// ciphertext undecryptable: a promotion (servers lacking the version could
// not decrypt what it encrypts) or a version leaving the decrypt set. The
// evidence is the record's own: each version's propagation times and each
// region's last usage observation (RecordPropagation), one "server" per
// region standing for all of its KMS servers. A region whose observation of
// the version is missing or older than ObservationMaxAge is unknown, and
// unknown counts as in use.
func (s *Server) checkStep(rec *statev1.KeysetRecord, step statev1.KeysetStep, keyID uint32, now time.Time) error {
	var check func(safety.Keyset, uint32, safety.Fleet, safety.Scope, safety.Params, time.Time) error
	switch step {
	case statev1.KeysetStep_KEYSET_STEP_PROMOTE:
		check = safety.CheckPromote
	case statev1.KeysetStep_KEYSET_STEP_DISABLE:
		check = safety.CheckRetire
	default:
		return nil // adds, re-enables, rewraps and steps on versions already out of the decrypt set lose nothing
	}
	k := lifecycle.Keyset(rec)
	p := safety.Params{Window: s.cfg.Safety.Window}
	err := check(k, keyID, s.observedFleet(rec, keyID, now), safety.ScopeFleet, p, now)
	if err == nil {
		return nil
	}
	if errors.Is(err, safety.ErrUnsafe) {
		return status.Errorf(codes.FailedPrecondition, "rootkms: %v", err)
	}
	return status.Errorf(codes.Internal, "rootkms: safety check: %v", err)
}

// checkClock refuses a step judged on time (promote, disable, schedule
// destroy, destroy) when the record's latest time is ahead of this leader's
// clock by more than ObservationMaxAge. Every time Latest counts is a
// command time some leader stamped, and the FSM never lets state time go
// back, so with correct clocks the record is never ahead of now by more
// than the clocks' skew. Further ahead, this clock is slow or an earlier
// leader's was fast. If this clock is slow, observations look fresher than
// they are and a destroy_after scheduled from here comes early; if an
// earlier leader's was fast, the FSM stamps this leader's commands with
// that too-late time (it clamps command times to Latest) and would destroy
// a version before its destroy_after. Refusing only delays the step until
// the clocks agree again; it never allows one.
//
// It does not catch this leader's own clock running ahead (nothing here is
// ahead of it then), nor a slow one when the record holds no recent time:
// checkClockQuorum (clockquorum.go), run after the Safety check, compares
// this clock with a quorum of voters' for that.
func (s *Server) checkClock(st *fsm.State, step statev1.KeysetStep, now time.Time) error {
	if !timeJudged(step) {
		return nil
	}
	latest, bound := st.Latest(), s.cfg.Safety.ObservationMaxAge
	if ahead := latest.Sub(now); ahead > bound {
		return status.Errorf(codes.FailedPrecondition,
			"rootkms: the record's latest time %s is %v ahead of this leader's clock (%s), more than %v: this clock is slow or an earlier leader's was fast; %s waits until the clocks agree",
			latest.UTC().Format(time.RFC3339), ahead.Round(time.Second), now.UTC().Format(time.RFC3339), bound, stepName(step))
	}
	return nil
}

// timeJudged reports whether step is judged on the leader's clock: a
// promotion or retirement (the Safety Condition compares the clock with the
// record's times), a scheduled destruction (destroy_after is the clock plus
// the delay) and a destruction (the FSM compares destroy_after with the
// command time the leader stamps).
func timeJudged(step statev1.KeysetStep) bool {
	switch step {
	case statev1.KeysetStep_KEYSET_STEP_PROMOTE, statev1.KeysetStep_KEYSET_STEP_DISABLE,
		statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, statev1.KeysetStep_KEYSET_STEP_DESTROY:
		return true
	}
	return false
}

// observedFleet is the fleet as the record last saw it for one version: a
// pseudo-server per region of the keyset.
func (s *Server) observedFleet(rec *statev1.KeysetRecord, keyID uint32, now time.Time) safety.Fleet {
	v := recordVersion(rec, keyID)
	maxAge := s.cfg.Safety.ObservationMaxAge
	var fleet safety.Fleet
	for _, region := range rec.GetRegions() {
		srv := safety.Server{Region: region} // no name: the whole region, as last observed
		var u *statev1.RegionUsage
		for _, x := range v.GetUsage() {
			if x.GetRegion() == region {
				u = x
			}
		}
		if u != nil && !u.GetObservedAt().AsTime().Add(maxAge).Before(now) {
			srv.Known = true
			sv := safety.ServedVersion{
				Decrypts: slices.ContainsFunc(v.GetPropagated(), func(t *statev1.RegionTime) bool { return t.GetRegion() == region }),
				// A region that still encrypts with the version (held back
				// from its successor's promotion, or rolled back) keeps it.
				Primary: u.GetServedAsPrimary(),
			}
			if t := u.GetLastEncrypt(); t != nil {
				sv.LastEncrypt = t.AsTime()
			}
			if t := u.GetLastUse(); t != nil {
				sv.LastUse = t.AsTime()
			}
			srv.Keysets = map[string]safety.ServedKeyset{rec.GetName(): {Versions: map[uint32]safety.ServedVersion{keyID: sv}}}
		}
		fleet.Servers = append(fleet.Servers, srv)
	}
	return fleet
}

// recordVersion is version keyID of rec, nil if it has none.
func recordVersion(rec *statev1.KeysetRecord, keyID uint32) *statev1.KeysetVersionRecord {
	for _, v := range rec.GetVersions() {
		if v.GetKeyId() == keyID {
			return v
		}
	}
	return nil
}

// regionAEAD unwraps one region key version into an AEAD. The caller must
// not keep it beyond the request.
func (s *Server) regionAEAD(key *rootkey.Key, st *fsm.State, region string, version uint32) (tink.AEAD, error) {
	r, ok := st.Region(region)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", region)
	}
	v, ok := r.Version(version)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: region %q has no key version %d", region, version)
	}
	if v.Status != cryptov1.KeyStatus_KEY_STATUS_PRIMARY && v.Status != cryptov1.KeyStatus_KEY_STATUS_ENABLED {
		return nil, status.Errorf(codes.FailedPrecondition, "rootkms: region %q key version %d is %s", region, version, v.Status)
	}
	m, err := key.Unwrap(region, v.Key)
	if err != nil {
		return nil, toStatus(err)
	}
	defer m.Wipe()
	a, err := keysets.RegionAEAD(m)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return a, nil
}

func (s *Server) encryptFor(key *rootkey.Key, st *fsm.State, h *keyset.Handle, name, region string, version uint32) (*cryptov1.EncryptedKeyset, error) {
	a, err := s.regionAEAD(key, st, region, version)
	if err != nil {
		return nil, err
	}
	ek, err := keysets.Encrypt(h, name, region, version, a)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return ek, nil
}

// openCopies decrypts every region copy of one keyset and checks that they
// hold the same keys. It returns the first copy's handle.
func (s *Server) openCopies(key *rootkey.Key, st *fsm.State, copies []*cryptov1.EncryptedKeyset) (*keyset.Handle, error) {
	if len(copies) == 0 {
		return nil, status.Error(codes.InvalidArgument, "rootkms: no keyset copies given")
	}
	name := copies[0].GetName()
	if err := keysets.ValidName(name); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	var first *keyset.Handle
	var firstPrint secret.Bytes
	defer func() { firstPrint.Wipe() }() // the value assigned below, not the zero one
	regions := map[string]bool{}
	for _, c := range copies {
		if c.GetName() != name {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: copies of different keysets (%q and %q)", name, c.GetName())
		}
		if regions[c.GetRegion()] {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: two copies for region %q", c.GetRegion())
		}
		regions[c.GetRegion()] = true
		a, err := s.regionAEAD(key, st, c.GetRegion(), c.GetRegionKeyVersion())
		if err != nil {
			return nil, err
		}
		h, err := keysets.Decrypt(c, a)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: keyset %s for %s: %v", name, c.GetRegion(), err)
		}
		fp, err := keysets.Fingerprint(h)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if first == nil {
			first, firstPrint = h, fp
			continue
		}
		same := fp.Equal(firstPrint)
		fp.Wipe()
		if !same {
			return nil, status.Errorf(codes.InvalidArgument, "rootkms: the copies of keyset %s for %s and %s hold different keys", name, copies[0].GetRegion(), c.GetRegion())
		}
	}
	return first, nil
}
