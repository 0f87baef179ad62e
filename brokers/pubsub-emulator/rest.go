package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"strconv"
	"strings"

	"cloud.google.com/go/pubsub/pstest"
	"github.com/golang/protobuf/jsonpb"
	"github.com/golang/protobuf/proto"
	pb "google.golang.org/genproto/googleapis/pubsub/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// restServer maps Pub/Sub's HTTP/JSON API (the google.api.http bindings of
// google/pubsub/v1/pubsub.proto) onto pstest's gRPC implementation.
type restServer struct {
	gs *pstest.GServer
}

func newREST(gs *pstest.GServer) http.Handler {
	// Google's clients send "$alt=json;enum-encoding=int": let the semicolon
	// through instead of having net/http drop the parameter and log about it.
	return http.AllowQuerySemicolons(&restServer{gs: gs})
}

// call is one REST binding resolved to a gRPC method.
type call struct {
	req proto.Message // request to fill from the body (body "*"); nil: no body
	run func(context.Context) (proto.Message, error)
}

func (s *restServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/" && r.Method == http.MethodGet {
		// The real emulator answers "Ok" here; scripts use it as a health check.
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "Ok\n")
		return
	}
	c, err := s.route(r)
	if err != nil {
		writeError(w, err)
		return
	}
	if c.req != nil {
		body, err := io.ReadAll(io.LimitReader(r.Body, 20<<20))
		if err != nil {
			writeError(w, status.Errorf(codes.InvalidArgument, "reading body: %v", err))
			return
		}
		if len(bytes.TrimSpace(body)) > 0 {
			body, err = fixFieldMasks(body)
			if err != nil {
				writeError(w, status.Errorf(codes.InvalidArgument, "invalid JSON body: %v", err))
				return
			}
			u := jsonpb.Unmarshaler{AllowUnknownFields: true}
			if err := u.Unmarshal(bytes.NewReader(body), c.req); err != nil {
				writeError(w, status.Errorf(codes.InvalidArgument, "invalid JSON body: %v", err))
				return
			}
		}
	}
	resp, err := s.invoke(r.Context(), c)
	if err != nil {
		writeError(w, err)
		return
	}
	m := jsonpb.Marshaler{EnumsAsInts: strings.Contains(r.URL.RawQuery, "enum-encoding=int")}
	var buf bytes.Buffer
	if err := m.Marshal(&buf, resp); err != nil {
		writeError(w, status.Errorf(codes.Internal, "encoding response: %v", err))
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	_, _ = w.Write(buf.Bytes())
}

// invoke runs the call, turning a panic inside pstest into INTERNAL.
func (s *restServer) invoke(ctx context.Context, c *call) (resp proto.Message, err error) {
	defer recovered("REST call", &err)
	resp, err = c.run(ctx)
	if err == nil && resp == nil {
		err = status.Error(codes.Internal, "empty response")
	}
	return resp, err
}

func (s *restServer) route(r *http.Request) (*call, error) {
	const prefix = "/v1/"
	path := r.URL.Path
	if !strings.HasPrefix(path, prefix) {
		return nil, status.Errorf(codes.NotFound, "no such path %q", path)
	}
	res := strings.TrimPrefix(path, prefix)
	verb := ""
	if i := strings.LastIndex(res, ":"); i >= 0 {
		res, verb = res[:i], res[i+1:]
	}
	seg := strings.Split(res, "/")
	q := r.URL.Query()
	pageSize := int32(0)
	if v := q.Get("pageSize"); v != "" {
		n, err := strconv.ParseInt(v, 10, 32)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "bad pageSize %q", v)
		}
		pageSize = int32(n)
	}
	pageToken := q.Get("pageToken")
	gs := s.gs
	m := r.Method
	bad := status.Errorf(codes.NotFound, "no REST binding for %s %s", m, path)

	if len(seg) < 2 || seg[0] != "projects" || seg[1] == "" {
		return nil, bad
	}
	project := "projects/" + seg[1]
	switch {
	// Collections: GET /v1/projects/P/{topics,subscriptions,snapshots}
	case len(seg) == 3 && verb == "" && m == http.MethodGet:
		switch seg[2] {
		case "topics":
			req := &pb.ListTopicsRequest{Project: project, PageSize: pageSize, PageToken: pageToken}
			return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.ListTopics(ctx, req) }}, nil
		case "subscriptions":
			req := &pb.ListSubscriptionsRequest{Project: project, PageSize: pageSize, PageToken: pageToken}
			return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.ListSubscriptions(ctx, req) }}, nil
		case "snapshots":
			req := &pb.ListSnapshotsRequest{Project: project, PageSize: pageSize, PageToken: pageToken}
			return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.ListSnapshots(ctx, req) }}, nil
		}
	// Topic sub-collections: GET /v1/projects/P/topics/T/{subscriptions,snapshots}
	case len(seg) == 5 && seg[2] == "topics" && verb == "" && m == http.MethodGet:
		topic := strings.Join(seg[:4], "/")
		switch seg[4] {
		case "subscriptions":
			req := &pb.ListTopicSubscriptionsRequest{Topic: topic, PageSize: pageSize, PageToken: pageToken}
			return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.ListTopicSubscriptions(ctx, req) }}, nil
		case "snapshots":
			req := &pb.ListTopicSnapshotsRequest{Topic: topic, PageSize: pageSize, PageToken: pageToken}
			return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.ListTopicSnapshots(ctx, req) }}, nil
		}
	case len(seg) == 4 && seg[2] == "topics":
		return topicCall(gs, res, m, verb, bad)
	case len(seg) == 4 && seg[2] == "subscriptions":
		return subscriptionCall(gs, res, m, verb, bad)
	case len(seg) == 4 && seg[2] == "snapshots":
		return snapshotCall(gs, res, m, verb, bad)
	}
	return nil, bad
}

func topicCall(gs *pstest.GServer, name, m, verb string, bad error) (*call, error) {
	switch {
	case verb == "" && m == http.MethodPut:
		req := &pb.Topic{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Name = name
			return gs.CreateTopic(ctx, req)
		}}, nil
	case verb == "" && m == http.MethodGet:
		req := &pb.GetTopicRequest{Topic: name}
		return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.GetTopic(ctx, req) }}, nil
	case verb == "" && m == http.MethodPatch:
		req := &pb.UpdateTopicRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			if req.Topic == nil {
				req.Topic = &pb.Topic{}
			}
			req.Topic.Name = name
			return gs.UpdateTopic(ctx, req)
		}}, nil
	case verb == "" && m == http.MethodDelete:
		req := &pb.DeleteTopicRequest{Topic: name}
		return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.DeleteTopic(ctx, req) }}, nil
	case verb == "publish" && m == http.MethodPost:
		req := &pb.PublishRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Topic = name
			return gs.Publish(ctx, req)
		}}, nil
	}
	return nil, bad
}

func subscriptionCall(gs *pstest.GServer, name, m, verb string, bad error) (*call, error) {
	switch {
	case verb == "" && m == http.MethodPut:
		req := &pb.Subscription{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Name = name
			return gs.CreateSubscription(ctx, req)
		}}, nil
	case verb == "" && m == http.MethodGet:
		req := &pb.GetSubscriptionRequest{Subscription: name}
		return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.GetSubscription(ctx, req) }}, nil
	case verb == "" && m == http.MethodPatch:
		req := &pb.UpdateSubscriptionRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			if req.Subscription == nil {
				req.Subscription = &pb.Subscription{}
			}
			req.Subscription.Name = name
			return gs.UpdateSubscription(ctx, req)
		}}, nil
	case verb == "" && m == http.MethodDelete:
		req := &pb.DeleteSubscriptionRequest{Subscription: name}
		return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.DeleteSubscription(ctx, req) }}, nil
	case m != http.MethodPost:
		return nil, bad
	case verb == "pull":
		req := &pb.PullRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Subscription = name
			return gs.Pull(ctx, req)
		}}, nil
	case verb == "acknowledge":
		req := &pb.AcknowledgeRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Subscription = name
			return gs.Acknowledge(ctx, req)
		}}, nil
	case verb == "modifyAckDeadline":
		req := &pb.ModifyAckDeadlineRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Subscription = name
			resp, err := modifyAckDeadline(ctx, req, nil, func(ctx context.Context, r interface{}) (interface{}, error) {
				return gs.ModifyAckDeadline(ctx, r.(*pb.ModifyAckDeadlineRequest))
			})
			if err != nil {
				return nil, err
			}
			msg, _ := resp.(proto.Message)
			return msg, nil
		}}, nil
	case verb == "modifyPushConfig":
		req := &pb.ModifyPushConfigRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Subscription = name
			return gs.ModifyPushConfig(ctx, req)
		}}, nil
	case verb == "seek":
		req := &pb.SeekRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Subscription = name
			return gs.Seek(ctx, req)
		}}, nil
	case verb == "detach":
		return nil, status.Error(codes.Unimplemented, "pubsub-emulator: DetachSubscription is not implemented")
	}
	return nil, bad
}

func snapshotCall(gs *pstest.GServer, name, m, verb string, bad error) (*call, error) {
	switch {
	case verb == "" && m == http.MethodPut:
		req := &pb.CreateSnapshotRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) {
			req.Name = name
			return gs.CreateSnapshot(ctx, req)
		}}, nil
	case verb == "" && m == http.MethodGet:
		req := &pb.GetSnapshotRequest{Snapshot: name}
		return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.GetSnapshot(ctx, req) }}, nil
	case verb == "" && m == http.MethodPatch:
		req := &pb.UpdateSnapshotRequest{}
		return &call{req: req, run: func(ctx context.Context) (proto.Message, error) { return gs.UpdateSnapshot(ctx, req) }}, nil
	case verb == "" && m == http.MethodDelete:
		req := &pb.DeleteSnapshotRequest{Snapshot: name}
		return &call{run: func(ctx context.Context) (proto.Message, error) { return gs.DeleteSnapshot(ctx, req) }}, nil
	}
	return nil, bad
}

// httpStatus maps gRPC codes to HTTP statuses as Google's REST front ends do
// (google/rpc/code.proto).
var httpStatus = map[codes.Code]int{
	codes.OK:                 200,
	codes.Canceled:           499,
	codes.Unknown:            500,
	codes.InvalidArgument:    400,
	codes.DeadlineExceeded:   504,
	codes.NotFound:           404,
	codes.AlreadyExists:      409,
	codes.PermissionDenied:   403,
	codes.ResourceExhausted:  429,
	codes.FailedPrecondition: 400,
	codes.Aborted:            409,
	codes.OutOfRange:         400,
	codes.Unimplemented:      501,
	codes.Internal:           500,
	codes.Unavailable:        503,
	codes.DataLoss:           500,
	codes.Unauthenticated:    401,
}

var statusName = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// writeError writes Google's JSON error envelope:
// {"error": {"code": 404, "message": "...", "status": "NOT_FOUND"}}.
func writeError(w http.ResponseWriter, err error) {
	st, _ := status.FromError(err)
	if st == nil {
		st = status.New(codes.Unknown, err.Error())
	}
	code, ok := httpStatus[st.Code()]
	if !ok {
		code = 500
	}
	name, ok := statusName[st.Code()]
	if !ok {
		name = "UNKNOWN"
	}
	body := map[string]interface{}{
		"error": map[string]interface{}{
			"code":    code,
			"message": st.Message(),
			"status":  name,
		},
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	if err := json.NewEncoder(w).Encode(body); err != nil {
		log.Printf("writing error response: %v", err)
	}
}

// fixFieldMasks rewrites a top-level "updateMask": "a,bC" (the proto3 JSON
// form of google.protobuf.FieldMask, which this jsonpb version cannot parse)
// into {"paths": ["a", "b_c"]}.
func fixFieldMasks(body []byte) ([]byte, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(body, &top); err != nil {
		return nil, err
	}
	raw, ok := top["updateMask"]
	if !ok {
		return body, nil
	}
	var mask string
	if err := json.Unmarshal(raw, &mask); err != nil {
		return body, nil // already an object (or invalid: let jsonpb say so)
	}
	paths := []string{}
	for _, p := range strings.Split(mask, ",") {
		if p = strings.TrimSpace(p); p != "" {
			paths = append(paths, snakeCase(p))
		}
	}
	fixed, err := json.Marshal(map[string][]string{"paths": paths})
	if err != nil {
		return nil, err
	}
	top["updateMask"] = fixed
	return json.Marshal(top)
}

func snakeCase(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
			r += 'a' - 'A'
		}
		b.WriteRune(r)
	}
	return b.String()
}
