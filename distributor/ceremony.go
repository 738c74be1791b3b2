package distributor

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// Ceremony errors; errors.go maps them to gRPC codes.
var (
	errNoCeremony       = errors.New("distributor: no such ceremony")
	errCeremonyClosed   = errors.New("distributor: ceremony is not open")
	errCeremonyExpired  = errors.New("distributor: ceremony expired")
	errWrongKind        = errors.New("distributor: wrong kind of ceremony for this call")
	errUnreadableShare  = errors.New("distributor: cannot open the sealed share (wrong ceremony key, ceremony, genesis or index, or tampered)")
	errShareMismatch    = errors.New("distributor: released share does not name this ceremony's genesis, epoch and index")
	errOfficerRepeated  = errors.New("distributor: officer already submitted a share to this ceremony")
	errOfficerNotOnSlot = errors.New("distributor: the manifest assigns this share to another officer")
)

// HPKE info labels (see distributor.proto). A rekeyed share's info is
// safe.RekeyShareInfo, which the officer opens it with.
const (
	infoShare     = "cairn/distributor/v1/share"
	infoProvision = "cairn/distributor/v1/provision"
	infoRootKey   = "cairn/distributor/v1/root-key"

	// infoRecipientCheck is the info of the throwaway message a rekey
	// plan's recipient keys are checked with; it is never sent.
	infoRecipientCheck = "cairn/distributor/v1/recipient-check"
)

// ceremony is one unseal or provisioning ceremony, held in memory only: a
// restart forgets it (and every share it received).
type ceremony struct {
	id        string
	kind      distributorv1.CeremonyKind
	state     distributorv1.CeremonyState
	manifest  *safev1.GenesisManifest
	recipient *hpkeseal.Recipient
	combiner  *safe.Combiner // unseal and rekey ceremonies
	officers  []string       // who contributed accepted shares, in order
	accepted  []uint32       // their share indices, in the same order
	openedAt  time.Time
	expiresAt time.Time
	detail    string

	plan          *distributorv1.RekeyPlan // rekey ceremonies
	newSlots      []safe.NewSlot           // the plan's slots, checked at open
	rekeyed       []byte                   // the new manifest, once rekeyed
	rekeyedSealed []*cryptov1.HpkeSealed   // the new shares, sealed to the plan's recipients
	rekeyedEpoch  uint32
}

func openCeremony(kind distributorv1.CeremonyKind, m *safev1.GenesisManifest, now time.Time, ttl time.Duration) (*ceremony, error) {
	var id [16]byte
	_, _ = rand.Read(id[:])
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		return nil, err
	}
	c := &ceremony{
		id: hex.EncodeToString(id[:]), kind: kind, state: distributorv1.CeremonyState_CEREMONY_STATE_OPEN,
		manifest: m, recipient: r, openedAt: now, expiresAt: now.Add(ttl),
	}
	if kind == distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL || kind == distributorv1.CeremonyKind_CEREMONY_KIND_REKEY {
		if c.combiner, err = safe.NewCombiner(m); err != nil {
			r.Close()
			return nil, err
		}
	}
	return c, nil
}

// end closes the ceremony in state st and wipes everything it holds.
func (c *ceremony) end(st distributorv1.CeremonyState, detail string) {
	c.state, c.detail = st, detail
	if c.combiner != nil {
		c.combiner.Wipe()
	}
	if c.recipient != nil {
		c.recipient.Close()
		c.recipient = nil
	}
}

// checkOpen expires the ceremony if its time is up and reports whether it
// still accepts input.
func (c *ceremony) checkOpen(now time.Time) error {
	if c.state == distributorv1.CeremonyState_CEREMONY_STATE_OPEN && !now.Before(c.expiresAt) {
		c.end(distributorv1.CeremonyState_CEREMONY_STATE_EXPIRED, "expired before the threshold was met; shares wiped")
	}
	switch c.state {
	case distributorv1.CeremonyState_CEREMONY_STATE_OPEN:
		return nil
	case distributorv1.CeremonyState_CEREMONY_STATE_EXPIRED:
		return fmt.Errorf("%w at %s", errCeremonyExpired, c.expiresAt.UTC().Format(time.RFC3339))
	default:
		return fmt.Errorf("%w (%s)", errCeremonyClosed, c.state)
	}
}

// submit checks one released share and accepts it. At the threshold it
// combines the shares and returns the RMK (checked against the KCV); the
// ceremony stays open until the caller has used the key and calls end, or
// takeBack if it could not. Any error leaves the ceremony as it was, except
// a failed combination, which ends it.
func (c *ceremony) submit(officer identity.ID, index uint32, sealed *cryptov1.HpkeSealed, now time.Time) (secret.Bytes, error) {
	if err := c.checkOpen(now); err != nil {
		return secret.Bytes{}, err
	}
	if c.kind != distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL && c.kind != distributorv1.CeremonyKind_CEREMONY_KIND_REKEY {
		return secret.Bytes{}, errWrongKind
	}
	slot := safe.Slot(c.manifest, index)
	if slot == nil {
		return secret.Bytes{}, fmt.Errorf("%w: index %d", safe.ErrUnknownShare, index)
	}
	if slot.GetOfficer() != "" && slot.GetOfficer() != officer.String() {
		return secret.Bytes{}, fmt.Errorf("%w: share %d belongs to %s", errOfficerNotOnSlot, index, slot.GetOfficer())
	}
	for _, o := range c.officers {
		if o == officer.String() {
			return secret.Bytes{}, fmt.Errorf("%w: %s", errOfficerRepeated, officer)
		}
	}
	info, err := hpkeseal.Info(infoShare, c.id, c.manifest.GetGenesisId(), strconv.FormatUint(uint64(index), 10))
	if err != nil {
		return secret.Bytes{}, err
	}
	plain, err := c.recipient.Open(sealed, info)
	if err != nil {
		return secret.Bytes{}, errUnreadableShare
	}
	defer plain.Wipe()
	raw := plain.Data()
	defer clear(raw)
	var rel safev1.ReleasedShare
	if err := proto.Unmarshal(raw, &rel); err != nil {
		return secret.Bytes{}, errUnreadableShare
	}
	share := secret.New(rel.GetShare())
	clear(rel.Share)
	defer share.Wipe()
	if rel.GetGenesisId() != c.manifest.GetGenesisId() || rel.GetEpoch() != c.manifest.GetEpoch() || rel.GetIndex() != index {
		return secret.Bytes{}, fmt.Errorf("%w: got %s/%d/%d", errShareMismatch, rel.GetGenesisId(), rel.GetEpoch(), rel.GetIndex())
	}
	if err := c.combiner.Add(index, share); err != nil {
		return secret.Bytes{}, err
	}
	c.officers = append(c.officers, officer.String())
	c.accepted = append(c.accepted, index)
	if !c.combiner.Ready() {
		return secret.Bytes{}, nil
	}
	rmk, err := c.combiner.Combine()
	if err != nil {
		c.end(distributorv1.CeremonyState_CEREMONY_STATE_FAILED, err.Error()+"; shares wiped")
		return secret.Bytes{}, err
	}
	return rmk, nil
}

// takeBack un-accepts the last accepted share: the key it completed could
// not be used (e.g. the audit log refused the record), so the ceremony stays
// open with the other shares and that officer submits again.
func (c *ceremony) takeBack() {
	n := len(c.accepted)
	if n == 0 || c.combiner == nil {
		return
	}
	c.combiner.Remove(c.accepted[n-1])
	c.accepted, c.officers = c.accepted[:n-1], c.officers[:n-1]
}

// rekeySlots checks a rekey plan, for a distributor of trust domain td, and
// returns its slots. Everything a rekey would trip on once the shares are in
// is checked here, so that a bad plan is refused at open instead of failing
// every final share of the ceremony.
func rekeySlots(p *distributorv1.RekeyPlan, td spiffeid.TrustDomain) ([]safe.NewSlot, error) {
	if p == nil {
		return nil, errors.New("distributor: a rekey ceremony needs a rekey plan")
	}
	var out []safe.NewSlot
	var officers []string
	labels := map[string]bool{}
	for i, sl := range p.GetSlots() {
		switch {
		case sl.GetSafeLabel() == "" || labels[sl.GetSafeLabel()]:
			return nil, fmt.Errorf("distributor: rekey slot %d: safe label %q empty or given twice", i+1, sl.GetSafeLabel())
		case sl.GetSafeKind() != safe.KindPKCS11 && sl.GetSafeKind() != safe.KindInsecureFile:
			return nil, fmt.Errorf("distributor: rekey slot %d: unknown safe kind %q", i+1, sl.GetSafeKind())
		case len(sl.GetRecipient().GetPublicKey()) == 0:
			return nil, fmt.Errorf("distributor: rekey slot %d: no recipient key", i+1)
		}
		// The new share is sealed to this key only when the ceremony
		// completes; sealing a throwaway message to it now refuses
		// whatever Seal would refuse then (another KEM, a wrong length,
		// a low-order point).
		if _, err := hpkeseal.Seal(sl.GetRecipient(), []byte(infoRecipientCheck), []byte{0}); err != nil {
			return nil, fmt.Errorf("distributor: rekey slot %d: recipient key: %w", i+1, err)
		}
		labels[sl.GetSafeLabel()] = true
		officers = append(officers, sl.GetOfficer())
		out = append(out, safe.NewSlot{SafeLabel: sl.GetSafeLabel(), SafeKind: sl.GetSafeKind(), Officer: sl.GetOfficer()})
	}
	if err := safe.ValidateSplit(int(p.GetThreshold()), len(out)); err != nil {
		return nil, fmt.Errorf("distributor: rekey plan of %d-of-%d: %w", p.GetThreshold(), len(out), err)
	}
	if err := checkOfficers(officers, td); err != nil {
		return nil, fmt.Errorf("distributor: rekey plan: %w", err)
	}
	return out, nil
}

// resplit makes the rekeyed manifest and the new shares sealed to the
// plan's recipients. It changes nothing in the ceremony: setRekeyed does,
// once the result is audited.
func (c *ceremony) resplit(rmk secret.Bytes, now time.Time) (*safev1.GenesisManifest, []*cryptov1.HpkeSealed, error) {
	m, shares, err := safe.Resplit(c.manifest, rmk, int(c.plan.GetThreshold()), c.newSlots, now)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		for _, s := range shares {
			s.Wipe()
		}
	}()
	var sealed []*cryptov1.HpkeSealed
	for i, share := range shares {
		idx := uint32(i + 1)
		raw := share.Data()
		plain, err := proto.Marshal(&safev1.ReleasedShare{GenesisId: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: idx, Share: raw})
		clear(raw)
		if err != nil {
			return nil, nil, err
		}
		info, err := safe.RekeyShareInfo(c.id, m.GetGenesisId(), m.GetEpoch(), idx)
		if err != nil {
			clear(plain)
			return nil, nil, err
		}
		s, err := hpkeseal.Seal(c.plan.GetSlots()[i].GetRecipient(), info, plain)
		clear(plain)
		if err != nil {
			return nil, nil, fmt.Errorf("distributor: sealing new share %d to its safe's key: %w", idx, err)
		}
		sealed = append(sealed, s)
	}
	return m, sealed, nil
}

// setRekeyed records a rekey's result and ends the ceremony.
func (c *ceremony) setRekeyed(m *safev1.GenesisManifest, sealed []*cryptov1.HpkeSealed) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return err
	}
	c.rekeyed, c.rekeyedSealed, c.rekeyedEpoch = b, sealed, m.GetEpoch()
	c.end(distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED, fmt.Sprintf("root key rebuilt from shares %v, matched the KCV and split %d-of-%d as epoch %d; the new shares are sealed to the new safes",
		c.accepted, m.GetThreshold(), len(m.GetSlots()), m.GetEpoch()))
	return nil
}

// provision opens a whole RMK sent by genesis and checks it against the
// ceremony's manifest.
func (c *ceremony) provision(sealed *cryptov1.HpkeSealed, now time.Time) (secret.Bytes, error) {
	if err := c.checkOpen(now); err != nil {
		return secret.Bytes{}, err
	}
	if c.kind != distributorv1.CeremonyKind_CEREMONY_KIND_PROVISION {
		return secret.Bytes{}, errWrongKind
	}
	info, err := hpkeseal.Info(infoProvision, c.id, c.manifest.GetGenesisId())
	if err != nil {
		return secret.Bytes{}, err
	}
	rmk, err := c.recipient.Open(sealed, info)
	if err != nil {
		return secret.Bytes{}, errUnreadableShare
	}
	if !safe.CheckKCV(rmk, c.manifest) {
		rmk.Wipe()
		return secret.Bytes{}, fmt.Errorf("%w: the provisioned key is not the manifest's", safe.ErrKCVMismatch)
	}
	return rmk, nil
}

// proto returns the ceremony's public view: never share bytes.
func (c *ceremony) proto() *distributorv1.Ceremony {
	out := &distributorv1.Ceremony{
		Id: c.id, Kind: c.kind, State: c.state, GenesisId: c.manifest.GetGenesisId(),
		Threshold: c.manifest.GetThreshold(), Officers: append([]string(nil), c.officers...),
		AcceptedIndices: append([]uint32(nil), c.accepted...),
		OpenedAt:        timestamppb.New(c.openedAt), ExpiresAt: timestamppb.New(c.expiresAt), Detail: c.detail,
	}
	if c.kind == distributorv1.CeremonyKind_CEREMONY_KIND_PROVISION {
		out.Threshold = 1
	}
	if c.recipient != nil {
		out.CeremonyKey = c.recipient.PublicKey()
	}
	if c.rekeyed != nil {
		out.RekeyedManifest = append([]byte(nil), c.rekeyed...)
		for _, s := range c.rekeyedSealed {
			out.RekeyedShares = append(out.RekeyedShares, proto.Clone(s).(*cryptov1.HpkeSealed))
		}
	}
	return out
}
