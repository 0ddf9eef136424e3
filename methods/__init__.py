"""Method plugins: one import per plugin, sorted. Importing registers them."""

from methods import barlow_twins as barlow_twins
from methods import byol as byol
from methods import cmc as cmc
from methods import colorization as colorization
from methods import deepcluster as deepcluster
from methods import densecl as densecl
from methods import dino as dino
from methods import directpred as directpred
from methods import inpainting as inpainting
from methods import jigsaw as jigsaw
from methods import mae as mae
from methods import mocov2 as mocov2
from methods import mocov3 as mocov3
from methods import npid as npid
from methods import pcl as pcl
from methods import pirl as pirl
from methods import pixels as pixels
from methods import random as random
from methods import relative_location as relative_location
from methods import rotation as rotation
from methods import simclr as simclr
from methods import simsiam as simsiam
from methods import supervised as supervised
from methods import swav as swav
from methods import vicreg as vicreg
