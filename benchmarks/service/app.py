"""The anchor: request_service's endpoints the way the seed's stack writes them.

Flask + Flask-SQLAlchemy: `db.session` is a scoped_session (one session per thread /
greenlet, removed at the app context's teardown), on the engine's QueuePool with
pool_pre_ping; MySQLdb (mysqlclient) is the MariaDB driver, sqlite3 the SQLite one.
Served by gunicorn with threads (see run). Same tables, same answers as request_service:

  POST /orders       {"customer":"alice","amount":42,"ref":"k1"} -> 201 {"id":7,"ref":"k1"}
  GET  /orders/<id>  -> 200 {"id":7,"customer":"alice","amount":42,"ref":"k1","audited":true}
  GET  /stats        -> 200 {"orders":N,"audit":N}

ANCHOR_DB is the SQLAlchemy URL; ANCHOR_POOL_SIZE the pool size per process.
`python3 app.py --reset` drops and creates the tables.
"""
import os
import re
import sys

from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import QueuePool

app = Flask(__name__)
url = os.environ["ANCHOR_DB"]
app.config["SQLALCHEMY_DATABASE_URI"] = url
engine_options = {
    "poolclass": QueuePool,
    "pool_size": int(os.environ.get("ANCHOR_POOL_SIZE", "8")),
    "max_overflow": 0,
    "pool_pre_ping": True,
}
if url.startswith("sqlite"):
    engine_options["connect_args"] = {"check_same_thread": False, "timeout": 30}
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options
db = SQLAlchemy(app)


class Order(db.Model):
    __tablename__ = "orders"
    id = db.Column(db.BigInteger().with_variant(db.Integer, "sqlite"), primary_key=True)
    ref = db.Column(db.String(64), nullable=False, unique=True)
    customer = db.Column(db.String(64), nullable=False)
    amount = db.Column(db.Integer, nullable=False)


class Audit(db.Model):
    __tablename__ = "audit"
    id = db.Column(db.BigInteger().with_variant(db.Integer, "sqlite"), primary_key=True)
    order_id = db.Column(db.BigInteger, nullable=False, index=True)
    event = db.Column(db.String(64), nullable=False)


CUSTOMER = re.compile(r"^[A-Za-z0-9 _.@-]{1,64}$")
REF = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
counter = iter(range(1, 1 << 62))


def error(status, message, ref=None):
    body = {"error": message}
    if ref:
        body["ref"] = ref
    return jsonify(body), status


@app.post("/orders")
def create_order():
    if request.mimetype == "application/json":
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            return error(400, "the body must be a JSON object")
    elif request.mimetype == "application/x-www-form-urlencoded":
        data = request.form.to_dict()
    else:
        return error(415, "Content-Type must be application/json or application/x-www-form-urlencoded")
    unknown = set(data) - {"customer", "amount", "ref"}
    if unknown:
        return error(400, "unknown field %r" % sorted(unknown)[0])
    customer, amount, ref = data.get("customer"), data.get("amount"), data.get("ref")
    if not isinstance(customer, str) or not CUSTOMER.match(customer):
        return error(400, '"customer" must be 1-64 characters of letters, digits, space, _ . @ -')
    if isinstance(amount, str) and request.mimetype != "application/json" and amount.isdigit():
        amount = int(amount)
    if not isinstance(amount, int) or isinstance(amount, bool) or not 1 <= amount <= 1000000:
        return error(400, '"amount" must be an integer from 1 to 1000000')
    if ref is None:
        ref = "srv-%d" % next(counter)
    elif not isinstance(ref, str) or not REF.match(ref):
        return error(400, '"ref" must be 1-64 characters of letters, digits, _ . -')
    try:
        order = Order(ref=ref, customer=customer, amount=amount)
        db.session.add(order)
        db.session.flush()
        db.session.add(Audit(order_id=order.id, event="order placed"))
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        return error(409, "an order with this ref exists already", ref)
    except DBAPIError as e:
        db.session.rollback()
        return error(503, "database error: %s" % e.orig, ref)
    return jsonify(id=order.id, ref=ref), 201


@app.get("/orders/<int:order_id>")
def get_order(order_id):
    order = db.session.get(Order, order_id)
    if order is None:
        return error(404, "no order %d" % order_id)
    audits = db.session.query(Audit).filter_by(order_id=order_id).count()
    return jsonify(id=order.id, customer=order.customer, amount=order.amount, ref=order.ref,
                   audited=audits == 1)


@app.get("/stats")
def stats():
    return jsonify(orders=db.session.query(Order).count(), audit=db.session.query(Audit).count())


if __name__ == "__main__" and sys.argv[1:] == ["--reset"]:
    with app.app_context():
        db.drop_all()
        db.create_all()
